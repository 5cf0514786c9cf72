"""Joint clipping and clipped sums against a brute-force one-example-at-a-time reference."""

import pytest
import torch

from peft_dp_saliency.candidates import find_candidates, group_units
from peft_dp_saliency.per_sample import PerSampleClipper, frozen_weights_tracked, tokens_and_features, use_ghost_norm
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


def engine_and_brute_force(unet, modules, inputs, params=("weight",)):
    """(engine result, brute-force sums, brute-force norms, C) at C = the median norm (some clipped)."""
    _, ref_norms = brute_force(unet, modules, inputs, 1.0, params)
    max_norm = float(ref_norms.median())  # some examples below C, some above
    ref_sums, _ = brute_force(unet, modules, inputs, max_norm, params)
    clipper = PerSampleClipper(modules, max_norm)
    with clipper.capture():
        out = clipper.clipped_sums(per_sample_loss(unet, inputs))
    assert (ref_norms > max_norm).any() and (ref_norms < max_norm).any()
    torch.testing.assert_close(out.norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert out.sums.keys() == ref_sums.keys()
    return out, ref_sums, ref_norms, max_norm


@pytest.mark.parametrize("pool", ["attn_qkv", "attn_qkvo", "all_linear", "all_linear_conv"])
def test_frozen_candidates_match_brute_force(pool):
    unet = tiny_unet().requires_grad_(False)
    modules = find_candidates(unet, pool)
    inputs = fixed_inputs(6)
    with frozen_weights_tracked(unet, modules):
        out, ref_sums, _, _ = engine_and_brute_force(unet, modules, inputs)
    atol = 1e-6 if pool == "all_linear_conv" else 1e-7  # a conv's gradient sums float32 over every position
    for key in ref_sums:
        torch.testing.assert_close(out.sums[key], ref_sums[key], rtol=1e-4, atol=atol)
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


def _engine_matches_brute_force(unet, modules, params):
    out, ref_sums, _, _ = engine_and_brute_force(unet, modules, fixed_inputs(5), params)
    for key in ref_sums:
        assert out.sums[key].shape == ref_sums[key].shape
        # float32 sums over every output position (up to 1e-7 relative to the largest entry in practice)
        torch.testing.assert_close(out.sums[key], ref_sums[key], rtol=1e-4, atol=1e-6)


def test_lora_on_convolutions_matches_brute_force():
    """PEFT's conv LoRA (lora_A kh x kw, strided where the base is; lora_B 1 x 1) and a Linear's LoRA in one
    joint norm."""
    from peft import LoraConfig
    from torch import nn

    unet = tiny_unet().requires_grad_(False)
    convs = {n: m for n, m in find_candidates(unet, "all_linear_conv").items() if isinstance(m, nn.Conv2d)}
    strided = [n for n, m in convs.items() if m.stride != (1, 1)]
    shortcuts = [n for n, m in convs.items() if m.kernel_size == (1, 1)]
    assert strided and shortcuts  # a downsampler and a 1 x 1 shortcut are covered
    resnet = next(n for n in convs if "resnets" in n and n.endswith("conv1"))
    targets = ["conv_in", resnet, strided[0], shortcuts[0], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=targets))
    modules = {n: m for n, m in unet.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert sum(isinstance(m, nn.Conv2d) for m in modules.values()) == 2 * (len(targets) - 1)
    _engine_matches_brute_force(unet, modules, ("weight",))


def test_trained_convolutions_with_bias_match_brute_force():
    """--no_lora on convolutions: the weights (C_out, C_in, kh, kw) and biases themselves."""
    from torch import nn

    unet = tiny_unet().requires_grad_(False)
    convs = {n: m for n, m in find_candidates(unet, "all_linear_conv").items() if isinstance(m, nn.Conv2d)}
    strided = next(n for n, m in convs.items() if m.stride != (1, 1))
    modules = {"conv_in": unet.conv_in, strided: convs[strided]}
    for module in modules.values():
        module.requires_grad_(True)
    _engine_matches_brute_force(unet, modules, ("weight", "bias"))


def test_unsupported_convolutions_are_refused_by_name():
    from torch import nn

    with pytest.raises(ValueError, match="grouped.*groups=2.*--candidate_pool all_linear for"):
        find_candidates(nn.ModuleDict({"grouped": nn.Conv2d(4, 4, 3, groups=2)}), "all_linear_conv")

    with pytest.raises(TypeError, match="grouped.*groups=2"):
        PerSampleClipper({"grouped": nn.Conv2d(4, 4, 3, groups=2)}, 1.0)
    with pytest.raises(TypeError, match="same.*padding='same'"):
        PerSampleClipper({"same": nn.Conv2d(4, 4, 3, padding="same")}, 1.0)
    with pytest.raises(TypeError, match="norm is a GroupNorm"):
        PerSampleClipper({"norm": nn.GroupNorm(2, 4)}, 1.0)


def test_a_module_input_shared_across_the_batch_is_refused():
    """Rows that do not belong to single examples would be split into pseudo-examples: clipping bounds nothing."""
    linear = torch.nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="multiple of the 2 examples"):
        tokens_and_features(linear, torch.randn(3, 6, 4), torch.randn(3, 6, 3), batch=2)
    with pytest.raises(RuntimeError, match="multiple of the 2 examples"):
        tokens_and_features(linear, torch.randn(1, 6, 4), torch.randn(2, 6, 3), batch=2)
    x, g = tokens_and_features(linear, torch.randn(4, 6, 4), torch.randn(4, 6, 3), batch=2)  # K = 2 draws each
    assert x.shape == (2, 12, 4) and g.shape == (2, 12, 3)
