"""The privacy audit: Clopper-Pearson bounds, the epsilon lower bound, canaries, scores, a tiny run."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from scipy import stats

from peft_dp_saliency import audit
from tiny_models import tiny_encoded_data, tiny_scheduler, tiny_unet

pytestmark = pytest.mark.timeout(200)


def test_clopper_pearson_upper_bound():
    assert audit.clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    upper = audit.clopper_pearson_upper(7, 40, 0.025)
    assert stats.binom.cdf(7, 40, upper) == pytest.approx(0.025)  # the defining equation
    assert audit.clopper_pearson_upper(5, 5, 0.05) == 1.0


def test_epsilon_lower_bound_of_perfect_random_and_dp_limited_attacks():
    upper = 1 - 0.025 ** (1 / 50)  # each side at alpha/2
    assert audit.epsilon_lower_bound(0, 50, 0, 50, delta=0.0) == pytest.approx(math.log((1 - upper) / upper))
    assert audit.epsilon_lower_bound(25, 50, 25, 50, delta=1e-5) == 0.0
    # The strongest attack (eps, delta)-DP allows at FPR = FNR: x + e^eps x = 1 - delta. Measured
    # on a million trials it certifies just under eps, never more.
    eps, delta, n = 2.0, 1e-3, 10**6
    x = (1 - delta) / (1 + math.exp(eps))
    bound = audit.epsilon_lower_bound(round(x * n), n, round(x * n), n, delta)
    assert eps - 0.05 < bound < eps


def test_canaries_are_distinct_balanced_and_split_for_honest_thresholds():
    canaries = audit.make_canaries(16, 32, 10, seed=0)
    assert len({im.tobytes() for im in canaries.images}) == 16
    assert canaries.images[0].size == (32, 32) and canaries.images[0].mode == "RGB"
    assert int(canaries.inserted.sum()) == 8 and int(canaries.tuning.sum()) == 8
    assert int((canaries.inserted & canaries.tuning).sum()) == 4
    assert sorted(canaries.labels.tolist()) == sorted([i % 10 for i in range(16)])
    with pytest.raises(ValueError, match="multiple of 4"):
        audit.make_canaries(10, 32, 10, seed=0)


def test_attack_chooses_its_threshold_on_one_half_and_is_bounded_on_the_other():
    canaries = audit.make_canaries(64, 8, 10, seed=1)
    perfect = canaries.inserted.float()
    result = audit.attack("perfect", perfect, canaries, delta=1e-3)
    assert result.auc == 1.0 and result.tpr == 1.0 and result.fpr == 0.0
    assert result.eps_lb == pytest.approx(audit.max_provable_epsilon(16, 16, 1e-3))
    noise = audit.attack("noise", torch.randn(64, generator=torch.Generator().manual_seed(0)), canaries, 1e-3)
    assert noise.eps_lb == 0.0
    # A threshold tuned on the tuning half only: scores that separate only the tuning half give nothing.
    leaky = torch.where(canaries.tuning, perfect, torch.zeros(64))
    assert audit.attack("leaky", leaky, canaries, 1e-3).eps_lb < result.eps_lb / 2


def test_mean_diffusion_loss_uses_fixed_pairs_independent_of_batching():
    unet, data = tiny_unet(), tiny_encoded_data(n=6)
    a = audit.mean_diffusion_loss(unet, tiny_scheduler(), data, [10, 500], 2, seed=3, batch_size=6)
    b = audit.mean_diffusion_loss(unet, tiny_scheduler(), data, [10, 500], 2, seed=3, batch_size=4)
    c = audit.mean_diffusion_loss(unet, tiny_scheduler(), data, [10, 500], 2, seed=4, batch_size=6)
    torch.testing.assert_close(a, b)
    assert a.shape == (6,) and not torch.allclose(a, c)


def test_tiny_audit_run_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "audit_example", Path(__file__).resolve().parents[1] / "examples" / "audit.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--output_dir", str(tmp_path), "--target_epsilons", "inf", "10",
                            "--num_canaries", "8", "--base_samples", "12", "--max_train_steps", "2",
                            "--expected_batch_size", "4", "--train_batch_size", "4",
                            "--timesteps", "100", "--noises_per_timestep", "1"])
    assert results["setup"]["N"] == 16
    runs = {r["target_epsilon"]: r for r in results["runs"]}
    assert runs["inf"]["private"] is False and runs["10"]["private"] is True
    assert float(runs["10"]["epsilon_pld"]) <= 10
    for run in runs.values():
        assert [a["statistic"] for a in run["attacks"]] == ["loss", "loss_gain"]
        for attack in run["attacks"]:
            assert 0 <= attack["eps_lb"] <= run["max_provable_epsilon"] + 1e-9
    assert (tmp_path / "results.json").is_file() and (tmp_path / "eps-10" / "privacy_report.json").is_file()
