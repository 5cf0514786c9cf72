"""Issue 12's mechanisms: automatic clipping, noise multiplicity, EMA release, selection budget
fraction; and LoDA adapters trained through the same command (issue 15)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_dp_saliency import accounting, load_adapter
from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.diffusion import per_sample_diffusion_loss
from peft_dp_saliency.per_sample import AUTOMATIC_CLIPPING_GAMMA, PerSampleClipper, frozen_weights_tracked
from peft_dp_saliency.public_model import load_public_pipeline
from script_runner import run, work_dir
from tiny_models import fixed_inputs, per_sample_loss, tiny_scheduler, tiny_unet

pytestmark = pytest.mark.timeout(600)


def per_example_gradients(unet, modules, loss_of_example, batch):
    """[(flat joint gradient of example i)] by one backward per example."""
    weights = [m.weight for m in modules.values()]
    return [torch.cat([g.flatten() for g in torch.autograd.grad(loss_of_example(i), weights)])
            for i in range(batch)]


def engine_sum(clipper, modules, loss):
    out = clipper.clipped_sums(loss)
    return torch.cat([out.sums[f"{n}.weight"].flatten() for n in modules]), out


def test_automatic_clipping_matches_brute_force_and_bounds_each_contribution():
    unet = tiny_unet().requires_grad_(False)
    modules = find_candidates(unet, "attn_qkv")
    inputs = fixed_inputs(5)
    c = 0.3
    with frozen_weights_tracked(unet, modules):
        grads = per_example_gradients(unet, modules,
                                      lambda i: per_sample_loss(unet, tuple(x[i:i + 1] for x in inputs)).sum(), 5)
        clipper = PerSampleClipper(modules, c, "automatic")
        with clipper.capture():
            total, out = engine_sum(clipper, modules, per_sample_loss(unet, inputs))
    contributions = [c * g / (g.norm() + AUTOMATIC_CLIPPING_GAMMA) for g in grads]
    assert all(float(x.norm()) <= c for x in contributions)  # sensitivity C
    torch.testing.assert_close(total, sum(contributions), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.norms, torch.stack([g.norm() for g in grads]), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("pool", ["attn_qkv", "all_linear_conv"])
@pytest.mark.parametrize("k", [1, 3])
def test_noise_multiplicity_matches_brute_force_mean_over_draws(k, pool):
    unet = tiny_unet().requires_grad_(False)
    scheduler = tiny_scheduler()
    modules = find_candidates(unet, pool)
    g = torch.Generator().manual_seed(1)
    batch = 4
    latents, states = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 24, generator=g)
    noise = torch.randn(batch * k, 4, 8, 8, generator=g)
    timesteps = torch.randint(0, 1000, (batch * k,), generator=g)

    def loss_of_example(i):  # the mean over example i's own k draws, computed alone
        rows = slice(i * k, (i + 1) * k)
        losses = [per_sample_diffusion_loss(unet, scheduler, latents[i:i + 1], states[i:i + 1],
                                            noise[r:r + 1], timesteps[r:r + 1]) for r in range(rows.start, rows.stop)]
        return torch.stack(losses).mean()

    with frozen_weights_tracked(unet, modules):
        grads = per_example_gradients(unet, modules, loss_of_example, batch)
        clipper = PerSampleClipper(modules, 0.05)
        with clipper.capture():
            loss = per_sample_diffusion_loss(unet, scheduler, latents, states, noise, timesteps)
            total, out = engine_sum(clipper, modules, loss)
    assert loss.shape == (batch,)
    expected = sum(min(1.0, 0.05 / (float(x.norm()) + 1e-6)) * x for x in grads)
    atol = 1e-6 if pool == "all_linear_conv" else 1e-7  # a conv's gradient sums float32 over every position
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=atol)
    torch.testing.assert_close(out.norms, torch.stack([x.norm() for x in grads]), rtol=1e-4, atol=1e-7)


def test_selection_budget_fraction_bounds_the_query_under_both_accountants():
    n, q, steps, target, fraction = 60_000, 256 / 60_000, 200, 1.0, 0.1
    delta = accounting.default_delta(n)
    sigma_s = accounting.selection_noise_for_budget(fraction * target, delta)
    query = [accounting.selection_stage(sigma_s, 1.0)]
    for name in accounting.ACCOUNTANTS:
        assert accounting.compute_epsilon(query, delta, name) <= fraction * target + 1e-9
    assert max(accounting.compute_epsilon(query, delta, name) for name in accounting.ACCOUNTANTS) > 0.09
    sigma = accounting.calibrate_noise_multiplier(target, delta, q, steps, query, "pld")
    report = accounting.PrivacyReport.build(query + [accounting.dp_sgd_stage(sigma, q, steps, 1.0)],
                                            n, delta, target, "pld")
    assert report.guarantee_epsilon <= target and report.budget_shares["selection"] <= fraction + 1e-9


def test_training_uses_the_calibrated_query_noise_and_releases_the_ema(tmp_path):
    out = tmp_path / "run"
    run(out, "--use_ema", "--ema_decay", "0.5", "--target_epsilon", 5, "--selection_budget_fraction", 0.2,
        samples=16, steps=3, batch=8)
    report = accounting.PrivacyReport.load(str(out / "privacy_report.json"))
    selection = [s for s in report.stage_objects() if s.name == "selection"][0]
    spent = [accounting.compute_epsilon([selection], report.delta, name) for name in accounting.ACCOUNTANTS]
    assert max(spent) <= 0.2 * 5 + 1e-9 and max(spent) > 0.15 * 5  # the binding accountant takes ~all of it
    checkpoint = work_dir(out) / "checkpoint-3"
    iterate = load_file(str(checkpoint / "trainable.safetensors"))
    ema = torch.load(checkpoint / "training_state.pt", weights_only=False)["ema"]["shadow_params"]
    released = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(ema) == len(iterate) == len(released)
    # diffusers names differ from PEFT's; compare as sorted multisets of tensors by shape and values
    as_set = lambda tensors: sorted((tuple(t.shape), round(float(t.double().sum()), 6)) for t in tensors)
    assert as_set(released.values()) == as_set(ema)
    assert as_set(released.values()) != as_set(iterate.values())


@pytest.mark.parametrize("variant", ["loda", "loda_plus"])
def test_loda_adapters_train_privately_and_reload(tmp_path, variant):
    out = tmp_path / variant
    run(out, "--adapter", variant, "--learning_rate", 0.05, "--seed", 0, samples=16, steps=2, batch=8)
    assert {"loda_adapter.safetensors", "loda_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    config = json.loads((out / "loda_config.json").read_text())
    assert config["variant"] == variant and config["target_modules"] == config["selection_result"]["selected"]
    assert "load_adapter" in (out / "README.md").read_text()
    pipe = load_public_pipeline()
    latents, states = torch.randn(1, 4, 8, 8), torch.randn(1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        public = pipe.unet(latents, torch.tensor([500]), states).sample
        load_adapter(pipe, out)
        adapted = pipe.unet(latents, torch.tensor([500]), states).sample
    assert not torch.allclose(public, adapted)


def test_a_subsampled_query_is_accounted_as_dp_accounting_does_and_divides_by_q_n():
    import dp_accounting

    from peft_dp_saliency.config import SaliencyLoraConfig
    from peft_dp_saliency.selection import _noisy_average_gradients
    from tiny_models import tiny_encoded_data

    n, q, sigma = 60_000, 0.1, 2.0
    delta = accounting.default_delta(n)
    ours = accounting.compute_epsilon([accounting.selection_stage(sigma, 1.0, q)], delta, "pld")
    pld = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
                                          value_discretization_interval=1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    assert ours == pytest.approx(pld.get_epsilon(delta), abs=1e-9)
    assert ours < accounting.compute_epsilon([accounting.selection_stage(sigma, 1.0)], delta, "pld")
    # the subsampled query sums the clipped gradients of its Poisson sample and divides by q N (not by
    # the realised sample size): rebuild the sample from the same (deterministic, test-only) generator
    from peft_dp_saliency.diffusion import EncodedDataset
    from peft_dp_saliency.dp_sgd import PoissonSampler
    from peft_dp_saliency.noise import noise_generator

    unet = tiny_unet().requires_grad_(False)
    data = tiny_encoded_data(n=40)
    modules = find_candidates(unet, "attn_qkv")
    common = dict(selection_noise_multiplier=1e-9, selection_clipping="flat", selection_seed=0,
                  deterministic_noise=True)
    sampled = _noisy_average_gradients(unet, tiny_scheduler(), data, modules,
                                       SaliencyLoraConfig(**common, selection_sample_rate=0.5), 40, False)
    sample = next(iter(PoissonSampler(40, 0.5, 1, noise_generator("cpu", 2000))))
    assert 0 < len(sample) < 40
    subset = EncodedDataset(data.latents[sample], data.labels[sample], data.prompt_embeds)
    mean_over_sample = _noisy_average_gradients(unet, tiny_scheduler(), subset, modules,
                                                SaliencyLoraConfig(**common), 40, False)
    for name, value in sampled.items():
        torch.testing.assert_close(value, mean_over_sample[name] * len(sample) / (0.5 * 40), rtol=1e-4, atol=1e-6)
