"""python -m peft_dp_saliency.select: the query alone, written as JSON with its privacy cost."""

import json

from peft_dp_saliency import select
from peft_dp_saliency.accounting import compute_epsilon, selection_stage


def test_select_cli_writes_selection_and_epsilon(tmp_path, capsys):
    out = tmp_path / "selection.json"
    select.main(["--max_train_samples", "16", "--selection_batch_size", "16", "--selection_ratio", "0.2",
                 "--candidate_pool", "attn_qkvo", "--output_json", str(out), "--seed", "0"])
    result = json.loads(out.read_text())
    total = sum(map(len, result["units"].values()))
    assert len(result["selected"]) == round(0.2 * total)
    assert set(result["scores"]) == set(result["units"])
    assert result["mechanism"]["dataset_size"] == 16 and result["mechanism"]["noise_multiplier"] == 5.0
    privacy = result["privacy"]
    assert privacy["epsilon"]["rdp"] == compute_epsilon([selection_stage(5.0, 1.0)], privacy["delta"], "rdp")
    assert "| block |" in capsys.readouterr().out
