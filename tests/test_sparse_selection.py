"""Private sparse selection (--selection_unit entry / row): the mask, masked DP-SGD, release, accounting."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peft_dp_saliency import selection as selection_module
from peft_dp_saliency.accounting import PrivacyReport
from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep, trainable_modules
from peft_dp_saliency.per_sample import PerSampleClipper, use_ghost_norm
from peft_dp_saliency.public_model import load_public_pipeline
from peft_dp_saliency.selection import load_paid_selection, select_target_modules
from peft_dp_saliency.sparse import add_masked_deltas, decode_masks, masks_of
from script_runner import run, training_script
from test_train import unet_output
from tiny_models import fixed_inputs, per_sample_loss, tiny_encoded_data, tiny_scheduler, tiny_unet

SIGMA_S, RATIO = 0.5, 0.1


def sparse_selection(unit, score="norm", data_seed=0, monkeypatch=None):
    """A deterministic sparse selection on the tiny UNet; with monkeypatch, also the query's noisy gradients."""
    captured = {}
    if monkeypatch is not None:
        original = selection_module._noisy_average_gradients
        monkeypatch.setattr(selection_module, "_noisy_average_gradients",
                            lambda *a, **k: captured.update(original(*a, **k)) or captured)
    config = SaliencyLoraConfig(selection_unit=unit, saliency_score=score, selection_ratio=RATIO,
                                selection_noise_multiplier=SIGMA_S, selection_seed=3, deterministic_noise=True)
    result = select_target_modules(tiny_unet(), tiny_scheduler(), tiny_encoded_data(seed=data_seed), config,
                                   show_progress=False)
    return result, captured


def brute_force_masks(noisy, unit, score, noise_std):
    """Every unit of the pool scored one by one, sorted, the top round(RATIO * U) set in fresh masks."""
    scored = []
    for name, grad in noisy.items():
        for row in range(grad.shape[0]):
            if unit == "entry":
                scored += [(float(grad[row, col].abs()), name, row, col) for col in range(grad.shape[1])]
            else:
                sq = float(grad[row].pow(2).sum())
                scored.append((sq ** 0.5 if score == "norm" else sq - grad.shape[1] * noise_std**2, name, row, None))
    masks = {name: torch.zeros(grad.shape, dtype=torch.bool) for name, grad in noisy.items()}
    for _, name, row, col in sorted(scored, reverse=True)[:round(RATIO * len(scored))]:
        masks[name][row, slice(None) if col is None else col] = True
    return masks


@pytest.mark.parametrize("unit,score", [("entry", "norm"), ("row", "norm"), ("row", "debiased")])
def test_mask_is_the_top_fraction_of_the_noisy_scores(monkeypatch, unit, score):
    result, noisy = sparse_selection(unit, score, monkeypatch=monkeypatch)
    expected = brute_force_masks(noisy, unit, score, SIGMA_S * 1.0 / 12)
    got = result.masks()
    assert result.selected == [name for name, mask in expected.items() if mask.any()]
    for name, mask in expected.items():
        assert torch.equal(got.get(name, torch.zeros_like(mask)), mask), name
    assert result.mask["trainable_parameters"] == sum(int(m.sum()) for m in expected.values())
    assert result.scores == {} and result.unit == unit

    other, _ = sparse_selection(unit, score, data_seed=1)  # other data: another mask, the same number of units
    units = lambda r: sum(m["units"] for m in r.mask["matrices"].values())  # noqa: E731
    assert other.mask["matrices"] != result.mask["matrices"] and units(other) == units(result)
    pool = sum(m.weight.numel() if unit == "entry" else m.weight.shape[0]
               for m in find_candidates(tiny_unet()).values())
    assert units(result) == round(RATIO * pool)


def test_the_query_is_the_matrix_units_query():
    sparse, _ = sparse_selection("entry")
    config = SaliencyLoraConfig(selection_ratio=RATIO, selection_noise_multiplier=SIGMA_S, selection_seed=3,
                                deterministic_noise=True)
    matrix = select_target_modules(tiny_unet(), tiny_scheduler(), tiny_encoded_data(), config, show_progress=False)
    assert sparse.mechanism == matrix.mechanism and matrix.mask is None


def random_masks(model, names, seed=0):
    """Entry masks (about 30%) for all but the last name, a whole-row mask for the last."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for i, name in enumerate(names):
        shape = model.get_submodule(name).weight.shape
        masks[name] = (torch.rand(shape, generator=g) < 0.3) if i < len(names) - 1 else \
            (torch.rand(shape[0], generator=g) < 0.5)[:, None].expand(shape).clone()
    return masks


def test_one_step_moves_and_noises_exactly_the_masked_entries():
    unet = tiny_unet()
    names = list(find_candidates(unet))[:4]
    masks = random_masks(unet, names)
    public = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = add_masked_deltas(unet, masks)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in trainable.items()} == {f"{n}.delta": (int(masks[n].sum()),) for n in names}

    settings = DPSGDSettings(noise_multiplier=2.0, max_grad_norm=0.05, sample_rate=0.5, dataset_size=12,
                             micro_batch_size=4)
    steps = [DPSGDStep(unet, tiny_scheduler(), tiny_encoded_data(), settings, torch.Generator().manual_seed(1),
                       torch.Generator().manual_seed(2)) for _ in range(2)]
    indices = torch.arange(6)
    clipped, _ = steps[0].clipped_sum(indices)  # same diffusion draws as the step below
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=1e-2)
    steps[1](indices)
    noise_gen = torch.Generator().manual_seed(1)
    for name, p in trainable.items():  # the noise: N(0, (sigma C)^2) drawn for the k masked entries only
        noise = p.grad * settings.sample_rate * settings.dataset_size - clipped[name]
        expected = 2.0 * 0.05 * torch.randn(p.shape, generator=noise_gen)
        torch.testing.assert_close(noise, expected, rtol=1e-4, atol=1e-6)
    optimizer.step()
    assert sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim()) == \
        2 * sum(p.numel() for p in trainable.values())  # Adam moments of the masked entries only
    state = unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in public.items())  # public weights (and all else) unchanged
    for name, module in modules.items():
        moved = (module.weight + module.update()) != public[f"{name}.weight"]
        assert torch.equal(moved, masks[name]), name


def brute_force_masked(model, modules, loss_fn, inputs, max_grad_norm):
    """Per example: autograd gradient of every delta (the masked entries), joint norm, flat clip, sum."""
    deltas = [m.delta for m in modules.values()]
    sums, norms = [torch.zeros_like(d) for d in deltas], []
    for i in range(inputs[0].shape[0]):
        grads = torch.autograd.grad(loss_fn(model, tuple(x[i:i + 1] for x in inputs)).sum(), deltas)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        for s, g in zip(sums, grads):
            s += min(1.0, max_grad_norm / (float(norms[-1]) + 1e-6)) * g
    return {f"{n}.delta": s for n, s in zip(modules, sums)}, torch.stack(norms)


def mlp_loss(model, inputs):
    return model(inputs[0]).pow(2).mean((1, 2))


@pytest.mark.parametrize("model_kind", ["unet", "mlp"])
def test_clipping_over_masked_entries_matches_brute_force(model_kind):
    if model_kind == "unet":  # materialised per-sample gradients (64 tokens)
        model, loss_fn, inputs = tiny_unet(), per_sample_loss, fixed_inputs(6)
        names = list(find_candidates(model))
    else:  # 2 tokens, 48 x 48: the row mask goes through ghost norms
        torch.manual_seed(0)
        model, loss_fn = nn.Sequential(nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 48)), mlp_loss
        inputs, names = (torch.randn(6, 2, 48),), ["0", "2"]
        assert use_ghost_norm(2, 48, 48)
    modules = add_masked_deltas(model, random_masks(model, names))
    with torch.no_grad():
        for m in modules.values():  # an update in place, so gradients differ from the public model's
            m.delta.normal_(std=0.1)
    _, ref_norms = brute_force_masked(model, modules, loss_fn, inputs, 1.0)
    max_norm = float(ref_norms.median())
    ref_sums, _ = brute_force_masked(model, modules, loss_fn, inputs, max_norm)
    clipper = PerSampleClipper(trainable_modules(model), max_norm, masks=masks_of(modules))
    assert clipper._rows[names[-1]] is not None and clipper._rows[names[0]] is None
    with clipper.capture():
        out = clipper.clipped_sums(loss_fn(model, inputs))
    torch.testing.assert_close(out.norms, ref_norms, rtol=1e-4, atol=1e-7)
    assert out.sums.keys() == ref_sums.keys()
    for key, ref in ref_sums.items():
        torch.testing.assert_close(out.sums[key], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    full = PerSampleClipper(trainable_modules(model), max_norm)  # the whole matrices' gradients: larger norms
    with full.capture():
        assert (full.clipped_sums(loss_fn(model, inputs)).norms > ref_norms * (1 + 1e-3)).all()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny private runs with the same flags: entry, row and matrix units."""
    base = tmp_path_factory.mktemp("sparse")
    for unit in ("entry", "row", "matrix"):
        run(base / unit, "--selection_unit", unit, "--seed", "0", "--target_epsilon", "8",
            "--selection_ratio", "0.2", "--learning_rate", "1e-2")
    return base


def trained_unet_output(out):
    """The UNet as training left it: public weights + the last checkpoint's delta vectors in the masks."""
    selection = json.loads((out / "selection.json").read_text())
    pipe = load_public_pipeline()
    add_masked_deltas(pipe.unet, decode_masks(selection["mask"], selection["selected"]))
    checkpoint = sorted(out.parent.glob(f"{out.name}-work/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    params = dict(pipe.unet.named_parameters())
    for name, value in load_file(str(checkpoint / "trainable.safetensors")).items():
        params[name].data.copy_(value)
    return unet_output(pipe), selection


@pytest.mark.parametrize("unit", ["entry", "row"])
def test_release_loads_with_load_lora_weights_and_reproduces_the_trained_unet(runs, unit):
    out = runs / unit
    reference, selection = trained_unet_output(out)
    pipe = load_public_pipeline()
    public = unet_output(pipe)
    pool = sum(m.weight.numel() if unit == "entry" else m.weight.shape[0]
               for m in find_candidates(pipe.unet).values())  # public: the base model's shapes
    pipe.load_lora_weights(str(out))
    loaded = unet_output(pipe)
    assert not torch.allclose(loaded, public)
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-5)

    masks = decode_masks(selection["mask"])
    weights = load_file(str(out / "adapter_model.safetensors"))
    for name, mask in masks.items():  # the released update B A is the trained delta: zero outside the mask
        prefix = f"base_model.model.{name}"
        if name not in selection["selected"]:
            assert not mask.any() and f"{prefix}.lora_B.weight" not in weights
            continue
        update = weights[f"{prefix}.lora_B.weight"] @ weights[f"{prefix}.lora_A.weight"]
        assert torch.equal(update != 0, mask), name
    assert sum(m["units"] for m in selection["mask"]["matrices"].values()) == round(0.2 * pool)
    assert selection["mask"]["trainable_parameters"] == sum(int(m.sum()) for m in masks.values())
    card = (out / "README.md").read_text()
    assert "private sparse selection" in card and f"{selection['mask']['trainable_parameters']:,}" in card


def test_epsilon_equals_that_of_the_matrix_unit_run(runs):
    matrix = PrivacyReport.load(str(runs / "matrix" / "privacy_report.json"))
    for unit in ("entry", "row"):
        report = PrivacyReport.load(str(runs / unit / "privacy_report.json"))
        assert report.stages == matrix.stages and report.epsilon == matrix.epsilon


def test_sparse_units_take_no_adapter_and_no_rerank(runs, tmp_path):
    with pytest.raises(SystemExit, match="takes no --adapter"):
        run(tmp_path / "x", "--selection_unit", "row", "--adapter", "loda")
    with pytest.raises(ValueError, match="sparse selection"):
        load_paid_selection(runs / "entry" / "selection.json")
    assert training_script().parse_args(["--selection_unit", "entry"]).selection_unit == "entry"


def test_mixed_precision_trains_fp32_deltas_on_frozen_bf16_weights(tmp_path):
    out = tmp_path / "bf16"
    run(out, "--selection_unit", "row", "--mixed_precision", "bf16", samples=16, batch=8)
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert PrivacyReport.load(str(out / "privacy_report.json")).private
