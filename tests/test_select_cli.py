"""python -m peft_dp_saliency.select: the query alone, written as JSON with its privacy cost."""

import json

from peft_dp_saliency import select
from peft_dp_saliency.accounting import compute_epsilon, selection_stage


def test_select_cli_writes_selection_and_epsilon(tmp_path, capsys):
    out = tmp_path / "selection.json"
    select.main(["--max_train_samples", "16", "--selection_batch_size", "16", "--selection_ratio", "0.2",
                 "--candidate_pool", "attn_qkvo", "--output_json", str(out), "--seed", "0",
                 "--target_epsilon", "4", "--selection_budget_fraction", "0.25"])
    result = json.loads(out.read_text())
    total = sum(map(len, result["units"].values()))
    assert len(result["selected"]) == round(0.2 * total)
    assert set(result["scores"]) == set(result["units"])
    mechanism, privacy = result["mechanism"], result["privacy"]
    assert mechanism["dataset_size"] == 16 and mechanism["sample_rate"] == 0.1  # the default subsampled query
    stage = selection_stage(mechanism["noise_multiplier"], 1.0, 0.1)
    assert privacy["epsilon"]["rdp"] == compute_epsilon([stage], privacy["delta"], "rdp")
    assert 0.9 <= max(privacy["epsilon"].values()) <= 1.0  # calibrated to 25% of epsilon 4 under both
    assert "| block |" in capsys.readouterr().out


def test_select_cli_under_replace_one_reports_only_the_accountants_that_support_it(tmp_path):
    """RDP cannot account a subsampled query under replace-one: the query must not run and then crash unwritten."""
    out = tmp_path / "selection.json"
    select.main(["--max_train_samples", "16", "--selection_batch_size", "16", "--output_json", str(out),
                 "--target_epsilon", "4", "--adjacency", "replace_one"])
    privacy = json.loads(out.read_text())["privacy"]
    assert privacy["adjacency"] == "replace_one" and list(privacy["epsilon"]) == ["pld"]
    assert 0 < privacy["epsilon"]["pld"] <= 0.4  # the default 10% of the budget
