"""DP-SGD: one step against a brute-force reference, Poisson sampling, q*N, micro-batches, noise once."""

import pytest
import torch
from peft import LoraConfig

from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.diffusion import draw_diffusion_inputs, per_sample_diffusion_loss
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep, poisson_sampler, trainable_modules
from tiny_models import tiny_encoded_data, tiny_scheduler, tiny_unet

N = 12


def lora_unet():
    unet = tiny_unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_v"], init_lora_weights=False))
    return unet


def make_step(unet, data, sigma=0.0, clip=1.0, q=0.5, micro=4, noise_seed=0, data_seed=0, empty=0.0):
    settings = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q,
                             dataset_size=len(data), micro_batch_size=micro, proportion_empty_prompts=empty)
    return DPSGDStep(unet, tiny_scheduler(), data, settings, torch.Generator().manual_seed(noise_seed),
                     torch.Generator().manual_seed(data_seed))


def grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def brute_force_step(unet, data, indices, sigma, clip, q, noise_seed, data_seed, empty=0.0):
    """Per example: its own loss, full gradient, joint clip; sum; add fixed noise; divide by qN.
    empty: each example conditioned on the empty prompt (the table's last row) with this probability,
    drawn after its (noise, timestep) from the same generator."""
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(data_seed)
    noise, t = draw_diffusion_inputs(len(indices), data.latents.shape[1:], tiny_scheduler(), generator, "cpu")
    unconditional = torch.rand(len(indices), generator=generator) < empty if empty else torch.zeros(len(indices), dtype=torch.bool)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for j, i in enumerate(indices.tolist()):
        latents, _ = data.batch(torch.tensor([i]))
        states = data.prompt_embeds[[-1 if unconditional[j] else int(data.labels[i])]]
        loss = per_sample_diffusion_loss(unet, tiny_scheduler(), latents, states, noise[j:j + 1], t[j:j + 1])
        g = dict(zip(params, torch.autograd.grad(loss.sum(), list(params.values()))))
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        for n in total:
            total[n] += g[n] * min(1.0, clip / (float(norm) + 1e-6))
    gen = torch.Generator().manual_seed(noise_seed)
    for n in total:
        total[n] += sigma * clip * torch.randn(total[n].shape, generator=gen)
    return {n: v / (q * len(data)) for n, v in total.items()}


def test_one_step_matches_brute_force_with_fixed_noise():
    unet, data = lora_unet(), tiny_encoded_data(n=N)
    indices = torch.tensor([0, 3, 4, 7, 11])
    make_step(unet, data, sigma=0.7, clip=0.05, q=0.4, micro=2, noise_seed=5, data_seed=9)(indices)
    expected = brute_force_step(unet, data, indices, 0.7, 0.05, 0.4, 5, 9)
    got = grads(unet)
    adapted = [n for n in find_candidates(tiny_unet()) if n.endswith(("to_q", "to_v"))]
    assert got.keys() == expected.keys() and len(got) == 2 * len(adapted)  # lora_A and lora_B each
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_empty_prompts_replace_each_examples_own_prompt_inside_the_clipped_sum():
    from dataclasses import replace

    base = tiny_encoded_data(n=N)
    empty_row = torch.randn(1, *base.prompt_embeds.shape[1:], generator=torch.Generator().manual_seed(1))
    data = replace(base, prompt_embeds=torch.cat([base.prompt_embeds, empty_row]),
                   empty_prompt_row=len(base.prompt_embeds))
    indices = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    drawn = torch.Generator().manual_seed(9)
    draw_diffusion_inputs(len(indices), data.latents.shape[1:], tiny_scheduler(), drawn, "cpu")
    assert 0 < int((torch.rand(len(indices), generator=drawn) < 0.5).sum()) < len(indices)  # a mix: the test can fail
    unet = lora_unet()
    make_step(unet, data, sigma=0.7, clip=0.05, q=0.4, micro=3, noise_seed=5, data_seed=9, empty=0.5)(indices)
    expected = brute_force_step(unet, data, indices, 0.7, 0.05, 0.4, 5, 9, empty=0.5)
    for name, value in grads(unet).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-7)
    unet_without = lora_unet()
    make_step(unet_without, data, sigma=0.7, clip=0.05, q=0.4, micro=3, noise_seed=5, data_seed=9)(indices)
    assert any(not torch.allclose(grads(unet_without)[n], expected[n]) for n in expected)
    with pytest.raises(ValueError, match="without the empty prompt"):
        make_step(lora_unet(), base, empty=0.5)(indices)


def test_micro_batch_size_does_not_change_the_update():
    data = tiny_encoded_data(n=N)
    indices = torch.arange(0, N, 2)
    results = []
    for micro in (1, 4, 6):
        unet = lora_unet()
        make_step(unet, data, sigma=0.0, clip=0.05, micro=micro)(indices)
        results.append(grads(unet))
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-4, atol=1e-8)


def test_divides_by_expected_batch_not_realised_size():
    data, indices = tiny_encoded_data(n=N), torch.tensor([1, 2])
    unet_a, unet_b = lora_unet(), lora_unet()
    make_step(unet_a, data, q=0.5)(indices)
    make_step(unet_b, data, q=0.25)(indices)
    for name, g in grads(unet_a).items():
        torch.testing.assert_close(grads(unet_b)[name], 2 * g)


def test_empty_batch_is_a_noise_only_step_and_noise_is_added_once():
    """Noise std on the update is sigma C / (qN), however many micro-batches (tolerance 8%)."""
    data = tiny_encoded_data(n=N)
    sigma, clip, q = 2.0, 0.5, 0.5
    unet = lora_unet()
    make_step(unet, data, sigma=sigma, clip=clip, q=q)(torch.tensor([], dtype=torch.long))
    empty = torch.cat([g.flatten() for g in grads(unet).values()])
    unet = lora_unet()
    make_step(unet, data, sigma=sigma * 1e4, clip=clip * 1e-4, q=q, micro=1)(torch.arange(N))
    many_micro = torch.cat([g.flatten() for g in grads(unet).values()])
    expected = sigma * clip / (q * N)
    for sample in (empty, many_micro):
        assert sample.numel() > 1000
        assert abs(sample.std().item() / expected - 1) < 0.08  # ~4 standard errors at 1.3k coordinates


def test_poisson_sampler_rate_and_independence():
    q, n, steps = 0.1, 500, 400
    batches = list(poisson_sampler(n, q, steps, torch.Generator().manual_seed(0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert len(batches) == steps
    assert abs(sizes.mean().item() - q * n) < 4 * (q * (1 - q) * n / steps) ** 0.5
    assert sizes.std().item() > 3  # realised sizes vary (not fixed-size batches)
    counts = torch.zeros(n)
    for b in batches:
        counts[torch.tensor(b, dtype=torch.long)] += 1
    assert abs(counts.mean().item() / steps - q) < 0.005
    assert any(len(b) == 0 for b in poisson_sampler(20, 0.01, 200, torch.Generator().manual_seed(1)))


def test_trainable_parameters_must_live_in_linear_or_conv_layers():
    unet = tiny_unet().requires_grad_(False)
    unet.conv_in.weight.requires_grad_(True)
    assert list(trainable_modules(unet)) == ["conv_in"]  # a Conv2d: per-sample gradients by unfolding
    unet.conv_norm_out.weight.requires_grad_(True)
    with pytest.raises(TypeError, match="conv_norm_out.*GroupNorm"):
        trainable_modules(unet)
    with pytest.raises(ValueError, match="no trainable"):
        trainable_modules(tiny_unet().requires_grad_(False))
