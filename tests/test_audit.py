"""The privacy audit: Clopper-Pearson bounds, the epsilon lower bound, canaries, scores, a tiny run."""

import math

import pytest
import torch
from scipy import stats

from peft_dp_saliency import audit
from peft_dp_saliency.families import get_family
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


def test_canaries_are_distinct_independent_coins_and_split_for_honest_thresholds():
    canaries = audit.make_canaries(16, 32, 10, seed=0)
    assert len({im.tobytes() for im in canaries.images}) == 16
    assert canaries.images[0].size == (32, 32) and canaries.images[0].mode == "RGB"
    members = int(canaries.inserted.sum())
    assert int((canaries.inserted & canaries.tuning).sum()) == members // 2
    assert int((~canaries.inserted & canaries.tuning).sum()) == (16 - members) // 2
    assert sorted(canaries.labels.tolist()) == sorted([i % 10 for i in range(16)])
    # Independent fair coins (the one-run bound's assumption), not a balanced half: over many
    # seeds the number inserted varies like Binomial(16, 1/2) (variance 4).
    counts = torch.tensor([float(audit.make_canaries(16, 4, 2, seed=s).inserted.sum()) for s in range(400)])
    assert abs(counts.mean().item() - 8) < 0.4 and 2.8 < counts.var().item() < 5.4
    with pytest.raises(ValueError, match="at least 4 canaries"):
        audit.make_canaries(2, 32, 10, seed=0)


def test_one_run_p_value_is_the_binomial_tail_of_randomized_response():
    # Pure DP: exactly P[Binomial(r, e^eps / (1 + e^eps)) >= v].
    assert audit.one_run_p_value(100, 20, 15, 0.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, 0.5))
    q = math.exp(1) / (1 + math.exp(1))
    assert audit.one_run_p_value(100, 20, 15, 1.0, 0.0) == pytest.approx(stats.binom.sf(14, 20, q))
    # delta adds 2 m delta max_i P[v > B >= v - i] / i, here computed by brute force.
    pmf = [stats.binom.pmf(j, 20, q) for j in range(15)]
    spread = max(sum(pmf[15 - i:15]) / i for i in range(1, 16))
    assert audit.one_run_p_value(100, 20, 15, 1.0, 1e-4) == pytest.approx(
        stats.binom.sf(14, 20, q) + 2 * 100 * 1e-4 * spread)
    with pytest.raises(ValueError):
        audit.one_run_p_value(10, 20, 15, 1.0, 0.0)


def test_one_run_bound_holds_for_a_mechanism_that_is_exactly_eps_dp():
    # Randomized response at eps = 1 is exactly 1-DP: each guess is right with probability
    # e / (1 + e). The 95% bound may exceed 1 in at most ~5% of runs (here 300 runs, m = 400).
    eps, m = 1.0, 400
    rng = torch.Generator().manual_seed(0)
    accuracy = math.exp(eps) / (1 + math.exp(eps))
    bounds = [audit.one_run_epsilon_lower_bound(m, m, int((torch.rand(m, generator=rng) < accuracy).sum()), 0.0)
              for _ in range(300)]
    assert sum(b > eps for b in bounds) <= 0.05 * 300 + 3 * math.sqrt(0.05 * 0.95 * 300)
    assert 0.6 < sorted(bounds)[150] < eps  # and it is not vacuous: the median is close below eps


def test_one_run_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    perfect = [audit.one_run_epsilon_lower_bound(1000, r, r, 0.0) for r in (10, 100, 1000)]
    assert 0 < perfect[0] < perfect[1] < perfect[2]
    q = 0.05 ** (1 / 1000)  # all 1000 right: q^1000 = alpha
    assert perfect[2] == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    assert audit.one_run_epsilon_lower_bound(1000, 100, 50, 0.0) == 0.0
    assert audit.one_run_epsilon_lower_bound(1000, 100, 100, 1e-4) < perfect[1]


def test_attack_chooses_its_threshold_on_one_half_and_is_bounded_on_the_other():
    canaries = audit.make_canaries(64, 8, 10, seed=1)
    perfect = canaries.inserted.float()
    result = audit.attack("perfect", perfect, canaries, delta=1e-3)
    assert result.auc == 1.0 and result.tpr == 1.0 and result.fpr == 0.0
    evaluation = ~canaries.tuning
    assert result.eps_lb == pytest.approx(audit.max_provable_epsilon(
        int((canaries.inserted & evaluation).sum()), int((~canaries.inserted & evaluation).sum()), 1e-3))
    # The one-run bound: the best of the 5 guess counts, each at level alpha / 5.
    assert result.eps_lb_one_run > 0 and result.eps_lb_one_run == audit.one_run_epsilon_lower_bound(
        64, result.one_run_guesses, result.one_run_correct, 1e-3, 0.05 / 5)
    noise = audit.attack("noise", torch.randn(64, generator=torch.Generator().manual_seed(0)), canaries, 1e-3)
    assert noise.eps_lb == 0.0 and noise.eps_lb_one_run == 0.0
    # A threshold tuned on the tuning half only: scores that separate only the tuning half give nothing.
    leaky = torch.where(canaries.tuning, perfect, torch.zeros(64))
    assert audit.attack("leaky", leaky, canaries, 1e-3).eps_lb < result.eps_lb / 2


def test_mean_diffusion_loss_uses_fixed_pairs_independent_of_batching():
    unet, data, sd = tiny_unet(), tiny_encoded_data(n=6), get_family("sd")
    a = audit.mean_diffusion_loss(sd, unet, tiny_scheduler(), data, [10, 500], 2, seed=3, batch_size=6)
    b = audit.mean_diffusion_loss(sd, unet, tiny_scheduler(), data, [10, 500], 2, seed=3, batch_size=4)
    c = audit.mean_diffusion_loss(sd, unet, tiny_scheduler(), data, [10, 500], 2, seed=4, batch_size=6)
    torch.testing.assert_close(a, b)
    assert a.shape == (6,) and not torch.allclose(a, c)


def test_tiny_audit_run_end_to_end(tmp_path):
    from peft_dp_saliency.commands import audit as audit_command

    results = audit_command.main(["--output_dir", str(tmp_path), "--target_epsilons", "inf", "10",
                            "--num_canaries", "8", "--base_samples", "12", "--max_train_steps", "2",
                            "--expected_batch_size", "4", "--train_batch_size", "4",
                            "--timesteps", "100", "--noises_per_timestep", "1", "--target_delta", "1e-3"])
    assert results["setup"]["N"] == 12 + results["setup"]["inserted"]
    runs = {r["target_epsilon"]: r for r in results["runs"]}
    assert runs["inf"]["private"] is False and runs["10"]["private"] is True
    assert float(runs["10"]["epsilon_pld"]) <= 10
    assert all(run["delta"] == 1e-3 for run in runs.values())  # --target_delta reaches the training runs
    for run in runs.values():
        assert [a["statistic"] for a in run["attacks"]] == ["loss", "loss_gain", "loss_ratio"]
        for attack in run["attacks"]:
            assert 0 <= attack["eps_lb"] <= run["max_provable_epsilon"] + 1e-9
            assert 0 <= attack["eps_lb_one_run"] <= run["max_provable_epsilon_one_run"] + 1e-9
    assert (tmp_path / "results.json").is_file() and (tmp_path / "eps-10" / "privacy_report.json").is_file()


def test_the_audit_runs_on_a_flow_matching_family(tmp_path):
    """The audit goes through the family seam: a tiny random SD3 (a transformer, flow-matching loss at
    float timesteps sigma = t / 1000) is trained, reloaded with its adapter and scored."""
    from peft_dp_saliency.commands import audit as audit_command
    from test_families import build

    build("sd3").save_pretrained(tmp_path / "model")
    results = audit_command.main(["--output_dir", str(tmp_path / "audit"), "--target_epsilons", "10",
                                  "--pretrained_model_name_or_path", str(tmp_path / "model"),
                                  "--resolution", "16", "--max_sequence_length", "8",
                                  "--num_canaries", "8", "--base_samples", "6", "--max_train_steps", "2",
                                  "--expected_batch_size", "4", "--train_batch_size", "4",
                                  "--timesteps", "100", "500", "--noises_per_timestep", "1", "--target_delta", "1e-3",
                                  "--train_args", "--candidate_pool", "all_linear", "--selection_ratio", "1",
                                  "--learning_rate", "0.05"])
    assert results["setup"]["family"] == "sd3" and results["setup"]["resolution"] == 16
    (run,) = results["runs"]
    assert run["private"] and float(run["epsilon_pld"]) <= 10
    # the adapter was loaded into the SD3 pipeline: the trained losses differ from the public model's
    assert run["mean_loss_gain"] != 0
