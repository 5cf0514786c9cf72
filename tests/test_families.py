"""Model families on tiny random models of each (SD, SDXL, SD3, Flux, Sana), all offline.

Per family: (1) per-example clipping of the family's candidate pool with PerSampleClipper equals
one-example-at-a-time autograd with the family's loss (noise multiplicity K = 2), which also checks
that no op mixes examples; (2) the release: a LoRA on some candidates, one clipped SGD step on the
family-encoded data, family.save_lora, then a fresh pipeline of that family reproduces the adapted
denoiser's outputs after ``load_lora_weights``.
"""

import json

import pytest
import torch
from diffusers import (AutoencoderDC, AutoencoderKL, DDPMScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SanaPipeline, SanaTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, Gemma2Config,
                          Gemma2Model, GemmaTokenizer, T5Config, T5EncoderModel, T5Tokenizer)

from peft_dp_saliency import hub
from peft_dp_saliency.candidates import group_units
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.diffusion import (EncodedDataset, draw_diffusion_inputs, encode_dataset,
                                        per_sample_diffusion_loss)
from peft_dp_saliency.dp_sgd import trainable_modules
from peft_dp_saliency.families import (FAMILIES, SUPPORTED_PIPELINES, ConditionedDataset, detect_family,
                                       get_family)
from peft_dp_saliency.families.flow import training_timesteps
from peft_dp_saliency.per_sample import PerSampleClipper, frozen_weights_tracked
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH
from tiny_models import tiny_scheduler, tiny_unet

PROMPTS = ["An image of a cat", "An image of a dog"]
RESOLUTION = 16  # 2-block VAEs: 8x8 latents
PROMPT_KWARGS = {"sd": {"resolution": RESOLUTION}, "sdxl": {"resolution": RESOLUTION},
                 **{name: {"resolution": RESOLUTION, "max_sequence_length": 8} for name in ("sd3", "flux", "sana")}}
WORDS = "an image of a the cat dog".split()


def clip_tokenizer():
    return CLIPTokenizer.from_pretrained(str(EMBEDDED_MODEL_PATH / "tokenizer"))  # model_max_length 20


def t5_tokenizer():
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def gemma_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in [f"▁{w}" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz▁"):
        vocab.setdefault(piece, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def clip(hidden=16, projection=16, with_projection=False):
    config = CLIPTextConfig(vocab_size=3357, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=20, projection_dim=projection,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5(d_model=32):
    return T5EncoderModel(T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def kl_vae(shift_factor=None):
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=RESOLUTION,
                         shift_factor=shift_factor, scaling_factor=0.5).eval()


def build(name: str):
    """A tiny random pipeline of the family (same seed -> same weights)."""
    torch.manual_seed(0)
    if name == "sd":
        return StableDiffusionPipeline(vae=kl_vae(), text_encoder=clip(hidden=24), tokenizer=clip_tokenizer(),
                                       unet=tiny_unet(), scheduler=tiny_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if name == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 16).eval()
        return StableDiffusionXLPipeline(vae=kl_vae(), text_encoder=clip(), text_encoder_2=clip(with_projection=True),
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                         scheduler=DDPMScheduler(prediction_type="v_prediction"))
    if name == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=8).eval()
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(0.1),
            text_encoder=clip(with_projection=True), tokenizer=clip_tokenizer(),
            text_encoder_2=clip(with_projection=True), tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5(), tokenizer_3=t5_tokenizer())
    if name == "flux":
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=[2, 2, 4]).eval()
        return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=kl_vae(0.1),
                            text_encoder=clip(), tokenizer=clip_tokenizer(), text_encoder_2=t5(),
                            tokenizer_2=t5_tokenizer())
    if name == "sana":
        tokenizer = gemma_tokenizer()
        text_encoder = Gemma2Model(Gemma2Config(
            head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
            num_key_value_heads=1, vocab_size=len(tokenizer) + 8, max_position_embeddings=64,
            attn_implementation="eager")).eval()
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407).eval()
        transformer = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8).eval()
        return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    raise ValueError(name)


class TinyImages(torch.utils.data.Dataset):
    """(image in [-1, 1] (3, R, R), label) items and the class prompts, like SensitiveImageDataset."""

    def __init__(self, n=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
        self.labels = torch.arange(n) % len(PROMPTS)
        self.prompts = PROMPTS

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def setup(name):
    pipe = build(name)
    pipe.set_progress_bar_config(disable=True)
    family = detect_family(pipe)
    assert family.name == name
    for module in family.frozen_modules(pipe):
        module.requires_grad_(False)
    data = family.encode_dataset(pipe, TinyImages(), show_progress=False, **PROMPT_KWARGS[name])
    return pipe, family, data, family.noise_scheduler(pipe)


def draws(family, scheduler, data, n, k=2, seed=0):
    return family.draw_inputs(n * k, data.latents.shape[1:], scheduler, torch.Generator().manual_seed(seed),
                              "cpu", data.latents.dtype)


def slice_cond(cond, i):
    return {key: v[i:i + 1] for key, v in cond.items()} if isinstance(cond, dict) else cond[i:i + 1]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_empty_prompt_row_is_the_familys_own_encoding_of_the_empty_string(name):
    pipe = build(name)
    family = detect_family(pipe)
    data = family.encode_dataset(pipe, TinyImages(), show_progress=False, empty_prompt=True, **PROMPT_KWARGS[name])
    empty = family.encode_prompts(pipe, [""], **PROMPT_KWARGS[name])
    _, cond = data.batch(torch.tensor([0, 1]), empty=torch.tensor([True, False]))
    _, plain = data.batch(torch.tensor([0, 1]))
    for key, value in (cond.items() if isinstance(cond, dict) else [(family.main_conditioning, cond)]):
        reference = empty[key] if isinstance(empty, dict) else empty
        assert torch.allclose(value[0], reference[0], atol=1e-5), key
        assert torch.equal(value[1], (plain[key] if isinstance(plain, dict) else plain)[1]), key


@pytest.mark.parametrize("pool", ["attn_qkvo", "all_linear"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_clipping_of_the_candidate_pool_matches_brute_force(name, pool):
    pipe, family, data, scheduler = setup(name)
    denoiser, k = family.denoiser(pipe), 2
    modules = family.candidates(denoiser, pool)
    indices = torch.tensor([0, 1, 2])
    latents, cond = data.batch(indices)
    noise, timesteps = draws(family, scheduler, data, len(indices), k)

    def loss_of(i, rows=None):
        rows = rows or slice(i * k, (i + 1) * k)
        return family.per_sample_loss(denoiser, scheduler, latents[i:i + 1], slice_cond(cond, i), noise[rows],
                                      timesteps[rows])

    with frozen_weights_tracked(denoiser, modules):
        weights = [m.weight for m in modules.values()]
        per_example = []
        for i in range(len(indices)):
            grads = torch.autograd.grad(loss_of(i).sum(), weights, allow_unused=True)
            per_example.append([torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)])
        ref_norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
        max_norm = float(ref_norms.median())  # one example clipped, one not
        factors = (max_norm / (ref_norms + 1e-6)).clamp(max=1.0)
        ref_sums = [sum(f * grads[j] for f, grads in zip(factors, per_example)) for j in range(len(weights))]
        clipper = PerSampleClipper(modules, max_norm)
        with clipper.capture():
            loss = family.per_sample_loss(denoiser, scheduler, latents, cond, noise, timesteps)
            out = clipper.clipped_sums(loss)
        with torch.no_grad():  # K = 2: each example's loss is the mean over its own two draws
            singles = [loss_of(i, slice(r, r + 1)) for i in range(len(indices)) for r in (i * k, i * k + 1)]
    torch.testing.assert_close(loss.detach(), torch.stack(singles).view(-1, k).mean(1).view(-1), rtol=1e-5, atol=1e-6)
    assert (ref_norms > max_norm).any() and (ref_norms < max_norm).any()
    torch.testing.assert_close(out.norms, ref_norms, rtol=1e-4, atol=1e-6)
    for (module_name, _), ref in zip(modules.items(), ref_sums):
        torch.testing.assert_close(out.sums[f"{module_name}.weight"], ref, rtol=1e-4, atol=1e-7)
    assert not any(p.requires_grad for p in denoiser.parameters())


def denoiser_output(family, pipe, data, seed=1):
    """The denoiser's raw output on fixed inputs (captured by a forward hook, any family's signature)."""
    denoiser = family.denoiser(pipe)
    scheduler = family.noise_scheduler(pipe)
    latents, cond = data.batch(torch.arange(len(data)))
    noise, timesteps = draws(family, scheduler, data, len(data), k=1, seed=seed)
    captured = []
    handle = denoiser.register_forward_hook(lambda module, args, output: captured.append(
        output[0] if isinstance(output, tuple) else output.sample))
    try:
        with torch.no_grad():
            family.per_sample_loss(denoiser, scheduler, latents, cond, noise, timesteps)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_release_loads_in_a_fresh_pipeline_of_the_family(name, tmp_path):
    pipe, family, data, scheduler = setup(name)
    denoiser = family.denoiser(pipe)
    base_output = denoiser_output(family, pipe, data)
    candidates = list(family.candidates(denoiser, "attn_qkv"))
    selected = candidates[::2]
    if name in ("sd3", "flux"):  # a context-stream projection of the joint attention is adapted too
        selected.append(next(c for c in candidates if c.endswith("add_k_proj")))
    config = SaliencyLoraConfig(r=2, lora_alpha=6, target_modules=selected, init_lora_weights="gaussian",
                                selection_strategy="all")
    denoiser.add_adapter(config)
    # one clipped (non-noised: a test) SGD step through the family's loss
    modules = trainable_modules(denoiser)
    params = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    clipper = PerSampleClipper(modules, 1.0)
    latents, cond = data.batch(torch.arange(len(data)))
    noise, timesteps = draws(family, scheduler, data, len(data), k=2)
    with clipper.capture():
        sums = clipper.clipped_sums(family.per_sample_loss(denoiser, scheduler, latents, cond, noise, timesteps)).sums
    assert set(sums) == set(params)
    with torch.no_grad():
        for n, p in params.items():
            p -= 50.0 * sums[n] / len(data)
    adapted_output = denoiser_output(family, pipe, data)
    assert (adapted_output - base_output).abs().max() > 1e-4  # the step changed the model

    family.save_lora(tmp_path, get_peft_model_state_dict(denoiser), config.lora_config_dict())
    fresh = build(name)
    fresh.load_lora_weights(str(tmp_path))
    fresh_denoiser = family.denoiser(fresh)
    assert {n.split(".lora_A.")[0] for n, _ in fresh_denoiser.named_parameters() if ".lora_A." in n} == set(selected)
    torch.testing.assert_close(denoiser_output(family, fresh, data), adapted_output, rtol=1e-5, atol=1e-6)


def test_detect_family_from_folders_dicts_pipelines_and_unsupported_classes(tmp_path):
    assert detect_family(EMBEDDED_MODEL_PATH).name == "sd"
    assert detect_family(EMBEDDED_MODEL_PATH / "model_index.json").name == "sd"
    for name, cls in FAMILIES.items():
        assert detect_family({"_class_name": cls.pipeline_class_name}).name == name
        assert detect_family(cls().pipeline_class).name == name
    assert isinstance(get_family("flux", guidance_scale=1.0), FAMILIES["flux"])
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline.*" + ".*".join(SUPPORTED_PIPELINES)):
        detect_family(tmp_path)
    with pytest.raises(ValueError, match="model_index.json"):
        detect_family(EMBEDDED_MODEL_PATH / "unet")
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("kandinsky")
    assert FAMILIES["sd"]().missing_files(EMBEDDED_MODEL_PATH) == []
    assert "text_encoder_2/config.json" in FAMILIES["sdxl"]().missing_files(EMBEDDED_MODEL_PATH)


def test_sd_family_is_todays_code_bit_for_bit(public_pipe, tmp_path):
    family = detect_family(public_pipe)
    dataset = TinyImages(n=3)
    dataset.images = torch.nn.functional.interpolate(dataset.images, size=public_pipe.vae.config.sample_size)
    ours, today = family.encode_dataset(public_pipe, dataset, show_progress=False), encode_dataset(
        public_pipe, dataset, show_progress=False)
    assert type(ours) is EncodedDataset
    assert torch.equal(ours.latents, today.latents) and torch.equal(ours.prompt_embeds, today.prompt_embeds)
    unet, scheduler = tiny_unet(), tiny_scheduler()
    latents, states = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 24)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise, t = family.draw_inputs(6, (4, 8, 8), scheduler, g1, "cpu")
    ref_noise, ref_t = draw_diffusion_inputs(6, (4, 8, 8), scheduler, g2, "cpu")
    assert torch.equal(noise, ref_noise) and torch.equal(t, ref_t)
    with torch.no_grad():
        reference = per_sample_diffusion_loss(unet, scheduler, latents, states, noise, t)
        assert torch.equal(family.per_sample_loss(unet, scheduler, latents, states, noise, t), reference)
        assert torch.equal(family.per_sample_loss(unet, scheduler, latents, {"encoder_hidden_states": states},
                                                  noise, t), reference)
    # save_lora writes exactly the file hub.save_adapter writes today
    config = SaliencyLoraConfig(r=2, lora_alpha=4, target_modules=list(family.candidates(unet))[:3],
                                selection_strategy="all")
    unet.add_adapter(config)
    hub.save_adapter(tmp_path / "hub", unet, config)
    family.save_lora(tmp_path / "family", get_peft_model_state_dict(unet), config.lora_config_dict())
    saved = [_lora_file(tmp_path / where / hub.LORA_WEIGHTS) for where in ("hub", "family")]
    assert saved[0][1] == saved[1][1]  # metadata (even two hub saves differ in the header's key order)
    assert saved[0][0].keys() == saved[1][0].keys()
    assert all(torch.equal(saved[0][0][key], saved[1][0][key]) for key in saved[0][0])


def _lora_file(path):
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def test_joint_attention_candidates_and_layer_units():
    for name in ("sd3", "flux"):
        family, denoiser = get_family(name), build(name).transformer
        names = list(family.candidates(denoiser, "attn_qkvo"))
        assert any(n.endswith("add_q_proj") for n in names) and any(n.endswith("to_add_out") for n in names)
        for unit, members in group_units(names, "layer").items():
            assert unit.endswith(".attn") and all(m.rsplit(".", 1)[0] in (unit, f"{unit}.to_out") for m in members)
        qkv = list(family.candidates(denoiser, "attn_qkv"))
        assert not any(n.endswith(("to_out.0", "to_add_out")) for n in qkv) and any("add_v_proj" in n for n in qkv)
    with pytest.raises(ValueError, match="unknown candidate pool"):
        get_family("flux").candidates(build("flux").transformer, "nope")


def test_flow_matching_draws_are_on_the_training_grid_and_reproducible():
    family = get_family("sd3")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = training_timesteps(scheduler)
    scheduler.set_timesteps(4)  # sampling changes .timesteps; the training grid must not change
    assert torch.equal(training_timesteps(scheduler), grid) and len(grid) == 1000
    noise, t = family.draw_inputs(64, (4, 8, 8), scheduler, torch.Generator().manual_seed(0), "cpu")
    noise2, t2 = family.draw_inputs(64, (4, 8, 8), scheduler, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(noise, noise2) and torch.equal(t, t2) and noise.shape == (64, 4, 8, 8)
    assert torch.isin(t, grid).all() and t.dtype == torch.float32
    with pytest.raises(ValueError, match="weighting_scheme"):
        get_family("sd3", weighting_scheme="cosmap")
    assert isinstance(get_family("sana").noise_scheduler(build("sana")), FlowMatchEulerDiscreteScheduler)
    data = get_family("flux").encode_dataset(build("flux"), TinyImages(), show_progress=False, max_sequence_length=8)
    assert isinstance(data, ConditionedDataset) and data.latents.shape == (5, 4, 8, 8)
    latents, cond = data.batch(torch.tensor([1, 2]))
    assert torch.equal(cond["prompt_embeds"], data.conditioning["prompt_embeds"][torch.tensor([1, 0])])
    assert cond["guidance"].tolist() == [3.5, 3.5] and cond["txt_ids"].shape == (2, 8, 3)


@pytest.mark.parametrize("name", ["sdxl", "flux", "sana"])
def test_a_saved_model_folder_is_detected_checked_and_loaded(name, tmp_path):
    build(name).save_pretrained(tmp_path)
    family = detect_family(tmp_path)
    assert family.name == name and family.missing_files(tmp_path) == []
    assert family.default_resolution(tmp_path) == RESOLUTION
    pipe = family.load_pipeline(tmp_path)
    assert type(pipe) is family.pipeline_class and family.denoiser(pipe) is getattr(pipe, family.denoiser_attr)
    assert type(family.noise_scheduler(tmp_path)) is family.scheduler_class
    reference = build(name)
    for (key, value), (_, expected) in zip(family.denoiser(pipe).state_dict().items(),
                                           family.denoiser(reference).state_dict().items()):
        assert torch.equal(value, expected), key
    assert torch.equal(family.encode_prompts(pipe, PROMPTS, **PROMPT_KWARGS[name])["prompt_embeds"],
                       family.encode_prompts(reference, PROMPTS, **PROMPT_KWARGS[name])["prompt_embeds"])


def imagefolder(root, n=8):
    """root/cat, root/dog with n/2 random 16x16 images each (a sensitive set of N = n)."""
    g = torch.Generator().manual_seed(3)
    for index in range(n):
        folder = root / ("cat", "dog")[index % 2]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(RESOLUTION, RESOLUTION, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "sana"])
def test_the_training_command_runs_end_to_end_on_the_family(name, tmp_path):
    """Selection query, 2 DP-SGD steps and the release through peft_dp_saliency.train, then the family's
    own pipeline loads the adapter and it changes the denoiser. Sana trains at 32 px: its pipeline samples
    (the release grid) at multiples of 32 only."""
    from peft_dp_saliency import train

    build(name).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    train.main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir",
                str(imagefolder(tmp_path / "data")), "--output_dir", str(out),
                "--resolution", str(32 if name == "sana" else RESOLUTION),
                "--max_train_steps", "2", "--expected_batch_size", "4", "--train_batch_size", "4",
                "--selection_batch_size", "8", "--selection_sample_rate", "1", "--num_validation_images", "1",
                "--seed", "0", "--learning_rate", "0.05",
                *(["--max_sequence_length", "8"] if name != "sdxl" else [])])
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["private"] and [s["name"] for s in report["stages"]] == ["selection", "dp_sgd"]
    family = get_family(name)
    fresh = family.load_pipeline(tmp_path / "model")
    before = denoiser_output(family, fresh, setup(name)[2])
    fresh.load_lora_weights(str(out))
    assert not torch.allclose(denoiser_output(family, fresh, setup(name)[2]), before)
    assert f"from diffusers import {family.pipeline_class_name}" in (out / "README.md").read_text()


def test_a_resolution_the_family_cannot_sample_fails_before_anything_is_spent(tmp_path):
    from peft_dp_saliency import train

    build("sana").save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match="unsupported --resolution: SanaPipeline samples at multiples of 32"):
        train.main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir",
                    str(imagefolder(tmp_path / "data")), "--output_dir", str(tmp_path / "out"),
                    "--resolution", "16", "--max_sequence_length", "8"])
    assert not (tmp_path / "out-work" / "ledger.json").exists()


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_the_select_command_runs_on_the_family(name, tmp_path):
    """python -m peft_dp_saliency.select goes through the same family seam as training."""
    from peft_dp_saliency import select

    build(name).save_pretrained(tmp_path / "model")
    out = tmp_path / "selection.json"
    select.main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir",
                 str(imagefolder(tmp_path / "data")), "--resolution", str(RESOLUTION), "--output_json", str(out),
                 "--selection_sample_rate", "1", "--selection_batch_size", "8", "--target_epsilon", "4",
                 *(["--max_sequence_length", "8"] if name != "sdxl" else [])])
    result = json.loads(out.read_text())
    candidates = get_family(name).candidates(get_family(name).denoiser(build(name)), "attn_qkv")
    assert {m for members in result["units"].values() for m in members} == set(candidates)
    assert result["selected"] and result["privacy"]["epsilon"]["pld"] > 0


def test_a_hub_id_is_read_through_cache_dir_offline(tmp_path):
    """--cache_dir reaches the config reads that come before any download (family and resolution): a Hub id
    whose snapshot lies only in `cache_dir` (huggingface_hub's layout) resolves offline; without it, it does not."""
    commit = "0" * 40
    repo = tmp_path / "models--example-org--tiny-sd"
    snapshot = repo / "snapshots" / commit
    for name in ("model_index.json", "vae/config.json", "unet/config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes((EMBEDDED_MODEL_PATH / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    family = detect_family("example-org/tiny-sd", cache_dir=str(tmp_path))
    assert family.name == "sd"
    vae_size = json.loads((EMBEDDED_MODEL_PATH / "vae/config.json").read_text())["sample_size"]
    assert family.default_resolution("example-org/tiny-sd", cache_dir=str(tmp_path)) == vae_size
    with pytest.raises(OSError):  # offline, another cache does not hold it
        detect_family("example-org/tiny-sd", cache_dir=str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fixed_timesteps_have_the_dtype_of_the_training_draws(name):
    """The audit scores canaries at fixed timesteps: same dtype as draw_inputs' (DDPM: integer indices,
    flow matching: float t with sigma = t / num_train_timesteps)."""
    pipe, family, data, scheduler = setup(name)
    _, drawn = draws(family, scheduler, data, 2)
    fixed = family.fixed_timesteps(100, 3, "cpu")
    assert fixed.dtype == drawn.dtype and fixed.tolist() == [100] * 3
