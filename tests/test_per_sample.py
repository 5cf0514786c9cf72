"""Joint clipping and clipped sums against a brute-force one-example-at-a-time reference."""

import pytest
import torch

from peft_dp_saliency.candidates import find_candidates, group_units
from peft_dp_saliency.per_sample import PerSampleClipper, frozen_weights_tracked, use_ghost_norm
from tiny_models import fixed_inputs, per_sample_loss, tiny_unet


def brute_force(unet, modules, inputs, max_grad_norm, params=("weight",)):
    """Per example: full gradient over all modules, clip jointly, sum."""
    tensors = [getattr(m, p) for m in modules.values() for p in params if getattr(m, p) is not None]
    names = [f"{n}.{p}" for n, m in modules.items() for p in params if getattr(m, p) is not None]
    sums = [torch.zeros_like(t) for t in tensors]
    norms = []
    for i in range(inputs[0].shape[0]):
        one = tuple(x[i:i + 1] for x in inputs)
        grads = torch.autograd.grad(per_sample_loss(unet, one).sum(), tensors)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for s, g in zip(sums, grads):
            s += factor * g
    return dict(zip(names, sums)), torch.stack(norms)


def engine_and_brute_force(unet, modules, inputs):
    """(engine result, brute-force sums, brute-force norms, C) at C = the median norm (some clipped)."""
    _, ref_norms = brute_force(unet, modules, inputs, 1.0)
    max_norm = float(ref_norms.median())  # some examples below C, some above
    ref_sums, _ = brute_force(unet, modules, inputs, max_norm)
    clipper = PerSampleClipper(modules, max_norm)
    with clipper.capture():
        out = clipper.clipped_sums(per_sample_loss(unet, inputs))
    assert (ref_norms > max_norm).any() and (ref_norms < max_norm).any()
    torch.testing.assert_close(out.norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert out.sums.keys() == ref_sums.keys()
    return out, ref_sums, ref_norms, max_norm


@pytest.mark.parametrize("pool", ["attn_qkv", "attn_qkvo", "all_linear"])
def test_frozen_candidates_match_brute_force(pool):
    unet = tiny_unet().requires_grad_(False)
    modules = find_candidates(unet, pool)
    inputs = fixed_inputs(6)
    with frozen_weights_tracked(unet, modules):
        out, ref_sums, _, _ = engine_and_brute_force(unet, modules, inputs)
    for key in ref_sums:
        torch.testing.assert_close(out.sums[key], ref_sums[key], rtol=1e-4, atol=1e-7)
    assert all(m.weight.grad is None for m in modules.values())
    assert not any(p.requires_grad for p in unet.parameters())


def test_layer_units_group_matrices_of_one_attention():
    unet = tiny_unet()
    names = list(find_candidates(unet, "attn_qkvo"))
    layers = group_units(names, "layer")
    assert all(len(members) == 4 for members in layers.values())
    assert all(unit.endswith(("attn1", "attn2")) for unit in layers)
    assert sum(map(len, layers.values())) == len(names)


def test_trainable_bias_is_part_of_the_joint_norm():
    unet = tiny_unet().requires_grad_(False)
    modules = {n: m for n, m in find_candidates(unet, "attn_qkvo").items() if n.endswith("to_out.0")}
    for m in modules.values():
        m.requires_grad_(True)
    inputs = fixed_inputs(4, seed=1)
    ref_sums, ref_norms = brute_force(unet, modules, inputs, 0.05, params=("weight", "bias"))
    clipper = PerSampleClipper(modules, 0.05)
    with clipper.capture():
        out = clipper.clipped_sums(per_sample_loss(unet, inputs))
    torch.testing.assert_close(out.norms, ref_norms, rtol=1e-4, atol=1e-6)
    for key in ref_sums:
        torch.testing.assert_close(out.sums[key], ref_sums[key], rtol=1e-4, atol=1e-7)


def test_ghost_rule():
    assert use_ghost_norm(tokens=16, d_in=64, d_out=64)
    assert not use_ghost_norm(tokens=4096, d_in=320, d_out=320)


def test_frozen_module_without_tracking_fails_clearly():
    unet = tiny_unet().requires_grad_(False)
    clipper = PerSampleClipper(find_candidates(unet), 1.0)
    with pytest.raises(RuntimeError, match="frozen_weights_tracked"):
        with clipper.capture():
            per_sample_loss(unet, fixed_inputs(2))
