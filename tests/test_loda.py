"""LoDA / LoDA+ adapters: exact start, per-sample clipping, LoRA special case, save/load/merge."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, set_peft_model_state_dict
from torch import nn

from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.dp_sgd import trainable_modules
from peft_dp_saliency.loda import add_loda_adapters, load_adapter, loda_state_dict, merge_to_lora_state, save_loda
from peft_dp_saliency.per_sample import PerSampleClipper
from peft_dp_saliency.public_model import load_public_pipeline
from test_per_sample import engine_and_brute_force
from tiny_models import fixed_inputs, per_sample_loss, tiny_unet

VARIANTS = ("loda", "loda_plus")
RANK, ALPHA = 4, 8


def randomise(modules, nonlinear=True, seed=1):
    """Non-zero B (and U, G when nonlinear) so every adapter weight gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules.values():
            for name in ("B", "f_out", "f_gate") if nonlinear else ("B",):
                if hasattr(m, name):
                    getattr(m, name).weight.normal_(std=0.3, generator=g)


def adapted_tiny_unet(variant, nonlinear=True):
    unet = tiny_unet()
    targets = list(find_candidates(unet, "attn_qkv"))
    modules = add_loda_adapters(unet, targets, RANK, ALPHA, variant, generator=torch.Generator().manual_seed(0))
    randomise(modules, nonlinear)
    return unet, targets


@pytest.mark.parametrize("variant", VARIANTS)
def test_starts_exactly_at_the_public_model(variant):
    unet, inputs = tiny_unet(), fixed_inputs(3)
    with torch.no_grad():
        before = per_sample_loss(unet, inputs)
    rng = torch.random.get_rng_state()
    targets = list(find_candidates(unet, "attn_qkv"))
    modules = add_loda_adapters(unet, targets, RANK, ALPHA, variant, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), rng)
    with torch.no_grad():
        assert torch.equal(per_sample_loss(unet, inputs), before)
    children = ["A", "B", "f_in", "f_out"] + (["f_gate"] if variant == "loda_plus" else [])
    assert list(trainable_modules(unet)) == [f"{n}.{c}" for n in targets for c in children]
    m = modules[targets[0]]
    d_in, d_out = m.base_layer.in_features, m.base_layer.out_features
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == RANK * (d_in + d_out) + len(children[2:]) * RANK**2  # 2 r^2 (LoDA), 3 r^2 (LoDA+)


def test_keeps_the_base_dtype_and_trains_in_float32():
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).to(torch.bfloat16)
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    before = model(x)
    modules = add_loda_adapters(model, ["0", "2"], rank=2, variant="loda_plus")
    assert torch.equal(model(x), before)
    randomise(modules)
    after = model(x)
    assert after.dtype == torch.bfloat16 and not torch.equal(after, before)
    assert all(p.dtype == torch.float32 for p in loda_state_dict(model).values())
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in modules.values())
    with pytest.raises(TypeError, match="nn.Linear"):
        add_loda_adapters(model, ["1"], rank=2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_clipped_sums_match_brute_force(variant):
    unet, _ = adapted_tiny_unet(variant)
    modules = trainable_modules(unet)
    inputs = fixed_inputs(6)
    out, ref_sums, _, _ = engine_and_brute_force(unet, modules, inputs)
    for key in ref_sums:
        assert ref_sums[key].abs().sum() > 0, key
        scale = float(ref_sums[key].abs().max())  # fp32 summation order differs
        torch.testing.assert_close(out.sums[key], ref_sums[key], rtol=1e-4, atol=1e-4 * scale)


def test_identity_f_gives_exactly_the_peft_lora_update():
    targets = list(find_candidates(tiny_unet(), "attn_qkv"))
    lora, loda = tiny_unet(), tiny_unet()
    lora.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian"))
    ours = add_loda_adapters(loda, targets, RANK, ALPHA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, m in ours.items():
            peft_layer = lora.get_submodule(name)
            peft_layer.lora_B.default.weight.normal_(std=0.3, generator=g)  # so that A moves too
            m.A.weight.copy_(peft_layer.lora_A.default.weight)
            m.B.weight.copy_(peft_layer.lora_B.default.weight)
            m.f_in.requires_grad_(False)
            m.f_out.requires_grad_(False)  # U = 0 and frozen: f = id
    inputs, public_a = fixed_inputs(4), {name: m.A.weight.clone() for name, m in ours.items()}
    for model in (lora, loda):
        clipper = PerSampleClipper(trainable_modules(model), 0.05)
        with clipper.capture():
            sums = clipper.clipped_sums(per_sample_loss(model, inputs)).sums
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p -= 0.5 * sums[name]
    for name, m in ours.items():
        peft_layer = lora.get_submodule(name)
        assert not torch.equal(m.A.weight, public_a[name])
        assert torch.equal(m.A.weight, peft_layer.lora_A.default.weight)
        assert torch.equal(m.B.weight, peft_layer.lora_B.default.weight)
    with torch.no_grad():
        assert torch.equal(per_sample_loss(loda, inputs), per_sample_loss(lora, inputs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_then_load_adapter_reproduces_outputs(tmp_path, variant):
    unet, targets = adapted_tiny_unet(variant)
    save_loda(tmp_path, unet, {"selection_strategy": "saliency", "rank": RANK})
    assert json.loads((tmp_path / "loda_config.json").read_text()) == {
        "selection_strategy": "saliency", "rank": RANK, "alpha": ALPHA, "variant": variant,
        "target_modules": targets}
    fresh = tiny_unet()
    load_adapter(SimpleNamespace(unet=fresh), tmp_path)
    inputs = fixed_inputs(3)
    with torch.no_grad():
        assert torch.equal(per_sample_loss(fresh, inputs), per_sample_loss(unet, inputs))
    with pytest.raises(ValueError, match="rank"):
        save_loda(tmp_path, unet, {"rank": RANK + 1})


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_is_exact_for_identity_f_and_refused_otherwise(variant):
    unet, targets = adapted_tiny_unet(variant, nonlinear=False)
    if variant == "loda_plus":  # the gate alone leaves f = id while U = 0
        unet.get_submodule(f"{targets[0]}.f_gate").weight.data.fill_(0.5)
    state = merge_to_lora_state(unet)
    assert state[f"{targets[0]}.lora_A.weight"].shape == (RANK, unet.get_submodule(targets[0]).base_layer.in_features)
    lora = tiny_unet()
    lora.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    result = set_peft_model_state_dict(lora, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    inputs = fixed_inputs(3)
    with torch.no_grad():
        assert torch.equal(per_sample_loss(lora, inputs), per_sample_loss(unet, inputs))
    unet.get_submodule(f"{targets[1]}.f_out").weight.data.fill_(0.1)
    with pytest.raises(ValueError, match=targets[1].replace(".", r"\.")):
        merge_to_lora_state(unet)


def test_public_pipeline_merge_via_diffusers_and_load_adapter(tmp_path, fresh_pipe):
    targets = list(find_candidates(fresh_pipe.unet, "attn_qkv"))
    modules = add_loda_adapters(fresh_pipe.unet, targets, RANK, ALPHA, "loda_plus")
    randomise(modules, nonlinear=False)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    states = torch.randn(2, 7, fresh_pipe.unet.config.cross_attention_dim, generator=g)

    def out(pipe):
        with torch.no_grad():
            return pipe.unet(x, t, states).sample

    other = load_public_pipeline()
    assert not torch.equal(out(other), out(fresh_pipe))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=convert_state_dict_to_diffusers(merge_to_lora_state(fresh_pipe.unet)),
        unet_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA, "target_modules": targets})
    other.load_lora_weights(str(tmp_path / "lora"))
    assert torch.equal(out(other), out(fresh_pipe))
    other.unload_lora_weights()

    randomise(modules, nonlinear=True)
    save_loda(tmp_path / "loda", fresh_pipe.unet)
    load_adapter(other, tmp_path / "loda")
    assert torch.equal(out(other), out(fresh_pipe))
