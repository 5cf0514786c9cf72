"""The flags taken from diffusers' train_text_to_image_lora.py: each acts per example, each is tested."""

import json

import datasets
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr
from peft import LoraConfig

from peft_dp_saliency import data as data_module
from peft_dp_saliency.diffusion import EncodedDataset, encode_dataset, encode_prompts
from peft_dp_saliency.dp_sgd import trainable_modules
from peft_dp_saliency.families import StableDiffusionFamily
from peft_dp_saliency.per_sample import PerSampleClipper
from script_runner import ledger_steps, run, work_dir
from test_training_config import TINY_RUN, small_fashion_dataset
from tiny_models import tiny_scheduler, tiny_unet

pytestmark = pytest.mark.timeout(600)


def loss_inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 24, generator=g),
            torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500, 990])[:batch])


def unweighted_mse(unet, scheduler, latents, states, noise, timesteps, target):
    prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
    return (prediction - target).pow(2).mean((1, 2, 3))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_gamma_weights_each_example_by_its_own_timestep(prediction_type):
    unet, scheduler = tiny_unet(), tiny_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    latents, states, noise, timesteps = loss_inputs()
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    with torch.no_grad():
        plain = unweighted_mse(unet, scheduler, latents, states, noise, timesteps, target)
        weighted = StableDiffusionFamily(snr_gamma=5.0).per_sample_loss(unet, scheduler, latents, states, noise,
                                                                        timesteps)
        alone = StableDiffusionFamily(snr_gamma=5.0).per_sample_loss(unet, scheduler, latents[1:2], states[1:2],
                                                                     noise[1:2], timesteps[1:2])
    snr = compute_snr(scheduler, timesteps)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    assert torch.allclose(weighted, plain * weight, rtol=1e-5)
    assert not torch.allclose(weighted, plain)  # the weights are not all 1 at these timesteps
    assert torch.allclose(alone, weighted[1:2], rtol=1e-5)  # no batch statistic: alone = in the batch


def test_noise_offset_adds_a_per_example_per_channel_shift_from_the_same_generator():
    scheduler = tiny_scheduler()
    noise, timesteps = StableDiffusionFamily(noise_offset=0.1).draw_inputs(
        5, (4, 8, 8), scheduler, torch.Generator().manual_seed(3), "cpu")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4, 8, 8, generator=g)
    shift = 0.1 * torch.randn(5, 4, 1, 1, generator=g)
    assert torch.allclose(noise, base + shift)
    assert torch.equal(timesteps, torch.randint(0, 1000, (5,), generator=g))
    plain, _ = StableDiffusionFamily().draw_inputs(5, (4, 8, 8), scheduler, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(plain, base)  # off by default: the old draws, bit for bit


def test_prediction_type_sets_the_training_target(public_pipe):
    family = StableDiffusionFamily(prediction_type="v_prediction")
    assert family.noise_scheduler(public_pipe).config.prediction_type == "v_prediction"
    assert StableDiffusionFamily().noise_scheduler(public_pipe).config.prediction_type == "epsilon"


def test_loss_flags_are_refused_for_flow_matching_families():
    from diffusers import StableDiffusion3Pipeline

    from peft_dp_saliency.train import model_family, parse_args

    with pytest.raises(SystemExit, match="--snr_gamma: DDPM \\(UNet\\) options only, not for StableDiffusion3Pipeline"):
        model_family(StableDiffusion3Pipeline, parse_args(["--snr_gamma", "5"]))


def test_random_flip_picks_each_examples_own_mirrored_latents():
    latents = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 3).contiguous()
    data = EncodedDataset(latents=latents, labels=torch.zeros(4, dtype=torch.long), prompt_embeds=torch.zeros(1, 2, 3),
                          flipped_latents=-latents)
    indices, flip = torch.tensor([3, 0, 2]), torch.tensor([True, False, True])
    picked, _ = data.batch(indices, flip)
    assert torch.equal(picked, torch.stack([-latents[3], latents[0], -latents[2]]))  # never another example's
    with pytest.raises(ValueError, match="without flipped latents"):
        EncodedDataset(latents, data.labels, data.prompt_embeds).batch(indices, flip)


def test_flipped_latents_are_the_encoding_of_each_mirrored_image(public_pipe):
    dataset = data_module.load_sensitive_dataset(max_examples=3)
    encoded = encode_dataset(public_pipe, dataset, batch_size=2, show_progress=False, flip=True, num_workers=1)
    vae = public_pipe.vae
    for i in range(3):
        image = dataset[i][0].flip(-1)[None]
        with torch.no_grad():
            expected = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
        assert torch.allclose(encoded.flipped_latents[i], expected[0], atol=1e-5)
    plain = encode_dataset(public_pipe, dataset, batch_size=2, show_progress=False)
    assert plain.flipped_latents is None and torch.allclose(plain.latents, encoded.latents, atol=1e-6)


def test_the_empty_prompt_is_encoded_as_the_pipeline_encodes_it_and_is_no_examples_row(public_pipe):
    dataset = data_module.load_sensitive_dataset(max_examples=3)
    encoded = encode_dataset(public_pipe, dataset, batch_size=2, show_progress=False, empty_prompt=True)
    plain = encode_dataset(public_pipe, dataset, batch_size=2, show_progress=False)
    assert encoded.empty_prompt_row == len(dataset.prompts) and plain.empty_prompt_row is None
    assert torch.allclose(encoded.prompt_embeds[-1], encode_prompts(public_pipe, [""])[0], atol=1e-5)
    assert torch.equal(encoded.batch(torch.arange(3))[1], plain.batch(torch.arange(3))[1])  # rows unchanged
    _, states = encoded.batch(torch.arange(3), empty=torch.tensor([False, True, False]))
    assert torch.equal(states[1], encoded.prompt_embeds[-1]) and torch.equal(states[0], plain.batch(torch.arange(1))[1][0])


def test_gradient_checkpointing_gives_the_same_per_sample_gradients():
    unet, scheduler = tiny_unet(), tiny_scheduler()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"))
    unet.train()
    latents, states, noise, timesteps = loss_inputs()
    clipper = PerSampleClipper(trainable_modules(unet), 1.0, "flat")

    def clipped():
        with clipper.capture():
            loss = StableDiffusionFamily().per_sample_loss(unet, scheduler, latents, states, noise, timesteps)
            return clipper.clipped_sums(loss)

    plain = clipped()
    unet.enable_gradient_checkpointing()
    recomputed = []
    module = next(iter(clipper.modules.values()))
    handle = module.register_forward_hook(lambda *args: recomputed.append(1))
    checkpointed = clipped()
    handle.remove()
    assert len(recomputed) == 2  # the forward really ran twice (once in the backward)
    assert torch.allclose(plain.norms, checkpointed.norms, rtol=1e-5)
    assert all(torch.allclose(plain.sums[k], checkpointed.sums[k], rtol=1e-4, atol=1e-7) for k in plain.sums)


def test_reentrant_checkpointing_fails_with_a_clear_message():
    from functools import partial

    unet, scheduler = tiny_unet(), tiny_scheduler()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="gaussian"))
    unet.train()
    unet.enable_gradient_checkpointing(partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    clipper = PerSampleClipper(trainable_modules(unet), 1.0, "flat")
    latents, states, noise, timesteps = loss_inputs()
    with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"), clipper.capture():
        StableDiffusionFamily().per_sample_loss(unet, scheduler, latents, states, noise, timesteps)


def test_captions_condition_each_example_on_its_own_text(public_pipe):
    rows = small_fashion_dataset(4).add_column("text", ["a shoe", "a dress", "a shoe", "a bag"])
    dataset = data_module.load_sensitive_dataset(rows, caption_column="text")
    encoded = encode_dataset(public_pipe, dataset, batch_size=2, show_progress=False)
    _, states = encoded.batch(torch.arange(4))
    for i, caption in enumerate(["a shoe", "a dress", "a shoe", "a bag"]):
        assert torch.allclose(states[i], encode_prompts(public_pipe, [caption])[0], atol=1e-5)
    assert len(encoded.prompt_embeds) == 3  # one embedding per distinct caption
    with pytest.raises(ValueError, match="empty or non-text"):
        data_module.load_sensitive_dataset(rows.map(lambda r, i: {"text": "" if i == 1 else r["text"]},
                                                    with_indices=True), caption_column="text")


def test_a_caption_run_releases_no_caption(tmp_path):
    from peft_dp_saliency import fit

    captions = [f"secret caption number {i}" for i in range(24)]
    rows = small_fashion_dataset(24).add_column("text", captions)
    result = fit(None, rows, output_dir=str(tmp_path / "out"), caption_column="text", **TINY_RUN)
    released = b"".join(p.read_bytes() for p in result.output_dir.iterdir())
    assert b"secret caption" not in released
    assert "per-example captions" in (result.output_dir / "README.md").read_text()


def test_interpolation_mode_changes_the_resize():
    from PIL import Image

    image = Image.effect_noise((40, 40), 64).convert("RGB")
    bilinear = data_module.resize_center_crop(image, 16)
    lanczos = data_module.resize_center_crop(image, 16, "lanczos")
    assert bilinear.size == lanczos.size == (16, 16) and not np.array_equal(np.asarray(bilinear), np.asarray(lanczos))
    assert np.array_equal(np.asarray(data_module.resize_center_crop(image, 16, "bilinear")), np.asarray(bilinear))


def test_dataset_config_name_and_cache_dir_reach_load_dataset(monkeypatch, tmp_path):
    seen = {}

    def fake_load_dataset(name, config_name=None, split=None, cache_dir=None):
        seen.update(name=name, config_name=config_name, split=split, cache_dir=cache_dir)
        return small_fashion_dataset(3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data_module.load_sensitive_dataset("someone/clothes", config_name="small", cache_dir=str(tmp_path))
    assert seen == {"name": "someone/clothes", "config_name": "small", "split": "train", "cache_dir": str(tmp_path)}
    from peft_dp_saliency.train import parse_args, tracker_config

    assert "cache_dir" not in tracker_config(parse_args(["--cache_dir", str(tmp_path)]))  # a local path


def test_a_tiny_run_with_every_new_flag(tmp_path):
    out = tmp_path / "out"
    run(out, "--random_flip", "--snr_gamma", "5", "--noise_offset", "0.05", "--prediction_type", "v_prediction",
        "--gradient_checkpointing", "--allow_tf32", "--dataloader_num_workers", "1", "--image_interpolation_mode",
        "lanczos", "--proportion_empty_prompts", "0.2", "--checkpoints_total_limit", "1", "--validation_epochs", "1", "--center_crop",
        "--expected_batch_size", "24", samples=24, steps=2)  # q = 1: an epoch is one step
    assert ledger_steps(out) == {"selection": 1, "dp_sgd": 2}
    assert [p.name for p in work_dir(out).glob("checkpoint-*")] == ["checkpoint-2"]
    assert sorted(p.name for p in (work_dir(out) / "validation").iterdir()) == ["step-1.png", "step-2.png"]
    assert not any("validation" in p.name for p in out.iterdir())  # grids of the iterates stay in the work folder
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("argv, match", [
    (["--no_center_crop"], "--no_center_crop \\(random crops\\) is not offered"),
    (["--enable_xformers_memory_efficient_attention"], "xformers is not installed"),
    (["--caption_column", "text", "--validation_prompt", ""], "--caption_column needs --validation_prompt"),
    (["--snr_gamma", "0"], "--snr_gamma must be > 0"),
    (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts must be in \\[0, 1\\]"),
    (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be >= 1"),
])
def test_bad_flags_fail_before_anything_is_spent(tmp_path, argv, match):
    from diffusers.utils import is_xformers_available

    if "xformers" in match and is_xformers_available():
        pytest.skip("xformers is installed here")
    with pytest.raises(SystemExit, match=match):
        run(tmp_path / "out", *argv)
    assert ledger_steps(tmp_path / "out") == {} and not (tmp_path / "out").exists()
