"""Flow-matching transformer families: SD3 (MMDiT), Flux (MMDiT + single-stream, packed latents), Sana.

Training as in diffusers' train_dreambooth_lora_{sd3,flux,sana}.py: u ~ the weighting scheme's
density, timestep t = scheduler.timesteps[floor(u N)] of a fresh FlowMatchEulerDiscreteScheduler
(its training grid, shifted unless dynamic shifting), sigma = t / N, x_t = (1 - sigma) x + sigma noise,
target = noise - x (velocity), unit loss weighting.
"""

from __future__ import annotations

import weakref

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from ..diffusion import mean_squared_error
from .base import ModelFamily, joint_attention_candidates, multiplicity, repeat_conditioning

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")  # all with unit loss weighting


class _FlowMatchingFamily(ModelFamily):
    denoiser_attr = "transformer"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    weighting_scheme = "none"

    def __init__(self, weighting_scheme: str | None = None, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        scheme = weighting_scheme or self.weighting_scheme
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {scheme!r}")
        self.weighting_scheme = scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    def draw_inputs(self, num_examples, latent_shape, noise_scheduler, generator, device, dtype=torch.float32):
        """Noise (n, *latent_shape) and float timesteps (n,) on the scheduler's training grid."""
        noise = torch.randn((num_examples, *latent_shape), generator=generator, device=device, dtype=dtype)
        u = compute_density_for_timestep_sampling(self.weighting_scheme, num_examples, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  device=device, generator=generator)
        grid = training_timesteps(noise_scheduler).to(device)
        indices = (u * len(grid)).long().clamp(0, len(grid) - 1)
        return noise, grid[indices]

    def per_sample_loss(self, denoiser, noise_scheduler, latents, conditioning, noise, timesteps):
        batch, k = latents.shape[0], multiplicity(latents, noise)
        cond = repeat_conditioning(conditioning, k)
        if k > 1:
            latents = latents.repeat_interleave(k, dim=0)
        sigmas = (timesteps.float() / noise_scheduler.config.num_train_timesteps).to(latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.predict(denoiser, noisy, timesteps, cond)
        return mean_squared_error(prediction, noise - latents, batch, k)

    def fixed_timesteps(self, timestep, num_examples, device):
        """Float timesteps (sigma = t / num_train_timesteps), like draw_inputs'."""
        return torch.full((num_examples,), float(timestep), device=device)

    def predict(self, denoiser, noisy, timesteps, conditioning) -> torch.Tensor:
        """The denoiser's velocity prediction, latent-shaped."""
        raise NotImplementedError

    def candidates(self, denoiser, pool="attn_qkv"):
        """Attention q/k/v(/out) of both streams: joint-attention context projections are their own entries."""
        return joint_attention_candidates(denoiser, pool)

    def save_lora(self, output_dir, state_dict, metadata=None) -> None:
        """Transformer adapters are saved with PEFT keys (as diffusers' transformer LoRA scripts do)."""
        super().save_lora(output_dir, state_dict, metadata)


_GRIDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def training_timesteps(noise_scheduler) -> torch.Tensor:
    """The scheduler's training timestep grid, from a fresh scheduler of its config (its own .timesteps
    change when sampling calls set_timesteps); cached per scheduler (the config is frozen)."""
    grid = _GRIDS.get(noise_scheduler)
    if grid is None:
        grid = _GRIDS[noise_scheduler] = type(noise_scheduler).from_config(noise_scheduler.config).timesteps.float()
    return grid


class StableDiffusion3Family(_FlowMatchingFamily):
    """StableDiffusion3Pipeline: CLIP-L + CLIP-G (+ optional T5) text, SD3Transformer2DModel."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    weighting_scheme = "logit_normal"  # train_dreambooth_lora_sd3.py's default
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_attrs = ("tokenizer", "tokenizer_2", "tokenizer_3")

    def required_files(self):  # T5 (text_encoder_3) may be dropped: SD3 then uses zeros for it
        return [f for f in super().required_files() if not f.startswith("text_encoder_3")]

    def missing_files(self, folder):
        return [f for f in super().missing_files(folder) if f != "tokenizer_3/"]

    def encode_prompts(self, pipe, prompts, resolution=None, max_sequence_length: int = 256, **kwargs):
        """{"prompt_embeds": (K, T_clip + T_t5, D), "pooled_projections": (K, P)} by the pipeline's encode_prompt."""
        prompts = list(prompts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=pipe.text_encoder.device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length, **kwargs)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def predict(self, denoiser, noisy, timesteps, cond):
        dtype = noisy.dtype
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                        pooled_projections=cond["pooled_projections"].to(dtype), return_dict=False)[0]


class FluxFamily(_FlowMatchingFamily):
    """FluxPipeline: CLIP pooled + T5 text, latents packed into 2x2 patches with img/txt position ids."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    weighting_scheme = "none"  # train_dreambooth_lora_flux.py's default
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")

    def __init__(self, guidance_scale: float = 3.5, **kwargs):
        super().__init__(**kwargs)
        self.guidance_scale = guidance_scale  # used only by guidance-distilled transformers (guidance_embeds)

    def encode_prompts(self, pipe, prompts, resolution=None, max_sequence_length: int = 512, **kwargs):
        """{"prompt_embeds": (K, T, D) T5, "pooled_projections": (K, P) CLIP, "txt_ids": (K, T, 3)[,
        "guidance": (K,)] }; txt_ids are the same for every class (zeros), guidance the training scale."""
        prompts = list(prompts)
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompts, device=pipe.text_encoder_2.device,
                                                      max_sequence_length=max_sequence_length, **kwargs)
        out = {"prompt_embeds": embeds, "pooled_projections": pooled,
               "txt_ids": text_ids.unsqueeze(0).expand(len(prompts), -1, -1).contiguous()}
        if pipe.transformer.config.guidance_embeds:
            out["guidance"] = torch.full((len(prompts),), float(self.guidance_scale), device=embeds.device)
        return out

    def predict(self, denoiser, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs latents into 2x2 patches: latent size {h}x{w} must be even")
        dtype = noisy.dtype
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        guidance = cond["guidance"].to(dtype) if "guidance" in cond else None
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_projections"].to(dtype),
                       encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                       txt_ids=cond["txt_ids"][0].to(dtype), img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height=h, width=w, vae_scale_factor=1)


class SanaFamily(_FlowMatchingFamily):
    """SanaPipeline: Gemma-2 text with an attention mask, DC-AE latents, linear-attention DiT."""

    name = "sana"
    pipeline_class_name = "SanaPipeline"
    weighting_scheme = "none"  # train_dreambooth_lora_sana.py's default
    # Sana's own scheduler config (DPM-Solver, flow prediction) loads as FlowMatchEuler (shift 1), as in
    # diffusers' Sana LoRA script.

    def encode_prompts(self, pipe, prompts, resolution=None, max_sequence_length: int = 300,
                       complex_human_instruction=None, **kwargs):
        """{"prompt_embeds": (K, T, D), "prompt_attention_mask": (K, T)} by the pipeline's encode_prompt."""
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                device=pipe.text_encoder.device,
                                                max_sequence_length=max_sequence_length,
                                                complex_human_instruction=complex_human_instruction, **kwargs)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def sampling_kwargs(self) -> dict:
        # Resolution binning snaps (height, width) to the aspect-ratio bins of the pretrained checkpoint's
        # sample_size; the adapter is trained at --resolution, so sample there.
        return {"use_resolution_binning": False}

    def check_resolution(self, resolution: int) -> None:
        if resolution % 32:  # SanaPipeline.check_inputs
            raise ValueError(f"SanaPipeline samples at multiples of 32 px, not {resolution}; choose another "
                             "--resolution")

    @torch.no_grad()
    def encode_images(self, pipe, images):
        vae = pipe.vae  # AutoencoderDC: deterministic latents
        return vae.encode(images.to(vae.device, vae.dtype)).latent * vae.config.scaling_factor

    def predict(self, denoiser, noisy, timesteps, cond):
        return denoiser(hidden_states=noisy, encoder_hidden_states=cond["prompt_embeds"].to(noisy.dtype),
                        encoder_attention_mask=cond["prompt_attention_mask"], timestep=timesteps,
                        return_dict=False)[0]
