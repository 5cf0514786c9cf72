"""UNet families (DDPM epsilon / v-prediction training): Stable Diffusion 1.x/2.x and SDXL."""

from __future__ import annotations

import torch
from diffusers.utils import convert_state_dict_to_diffusers

from ..diffusion import EncodedDataset, draw_diffusion_inputs, encode_dataset, encode_prompts, mean_squared_error
from ..diffusion import min_snr_weights, per_sample_diffusion_loss
from .base import ModelFamily, component_config, multiplicity, repeat_conditioning


class _DDPMFamily(ModelFamily):
    denoiser_attr = "unet"
    scheduler_class_name = "DDPMScheduler"
    loss_options = ("snr_gamma", "noise_offset", "prediction_type")

    def __init__(self, snr_gamma: float | None = None, noise_offset: float = 0.0, prediction_type: str | None = None):
        """The loss options of diffusers' train_text_to_image_lora.py, each acting per example:
        snr_gamma: Min-SNR-gamma weight of each example's loss by its own timestep (None: unit weights);
        noise_offset: std of a per-example, per-channel constant added to its diffusion noise;
        prediction_type: 'epsilon' or 'v_prediction' target (None: the scheduler's own)."""
        self.snr_gamma, self.noise_offset, self.prediction_type = snr_gamma, noise_offset, prediction_type

    def noise_scheduler(self, source, revision=None, **kwargs):
        scheduler = super().noise_scheduler(source, revision, **kwargs)
        if self.prediction_type is not None:  # as diffusers: register_to_config on the training scheduler
            scheduler.register_to_config(prediction_type=self.prediction_type)
        return scheduler

    def draw_inputs(self, num_examples, latent_shape, noise_scheduler, generator, device, dtype=torch.float32):
        """Noise (plus noise_offset x N(0, 1) per example and channel) and integer timesteps uniform in
        [0, num_train_timesteps) (diffusers' scripts)."""
        return draw_diffusion_inputs(num_examples, latent_shape, noise_scheduler, generator, device, dtype,
                                     noise_offset=self.noise_offset)

    def use_fast_sampler(self, pipe) -> None:
        from ..sampling import use_dpm_solver

        use_dpm_solver(pipe)

    def save_lora(self, output_dir, state_dict, metadata=None) -> None:
        """UNet adapters of attention projections only are saved in diffusers' key format (as diffusers' UNet
        LoRA scripts do); any other adapter keeps PEFT's keys throughout.

        convert_state_dict_to_diffusers renames only to_q/k/v/out keys, and load_lora_weights reads the format
        off the FIRST key: a mix (feed-forward, time-embedding or conv LoRA next to attention) would be loaded
        without the keys of the other format, silently (PEFT only warns)."""
        converted = convert_state_dict_to_diffusers(state_dict)
        mixed = any(".lora_A." in key or ".lora_B." in key for key in converted)
        super().save_lora(output_dir, state_dict if mixed else converted, metadata)


class StableDiffusionFamily(_DDPMFamily):
    """StableDiffusionPipeline (SD 1.x / 2.x, the embedded model): exactly today's code paths."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    main_conditioning = "encoder_hidden_states"

    def load_pipeline(self, pretrained_model_name_or_path, **kwargs):
        kwargs = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
        return super().load_pipeline(pretrained_model_name_or_path, **kwargs)

    def default_resolution(self, pretrained_model_name_or_path, revision=None, cache_dir=None) -> int:
        vae = component_config(pretrained_model_name_or_path, "vae", revision, cache_dir)
        return int(vae.get("sample_size", 512))

    def encode_prompts(self, pipe, prompts, resolution=None, **kwargs):
        """{"encoder_hidden_states": (K, T, D)}: the text encoder's last hidden states (diffusion.encode_prompts)."""
        return {"encoder_hidden_states": encode_prompts(pipe, prompts)}

    def make_dataset(self, latents, labels, conditioning, flipped_latents=None, prompt_ids=None,
                     empty_prompt_row=None) -> EncodedDataset:
        # a plain EncodedDataset: batch() gives the (B, T, D) tensor, as every existing caller expects
        return EncodedDataset(latents=latents, labels=labels, prompt_embeds=conditioning["encoder_hidden_states"],
                              flipped_latents=flipped_latents, prompt_ids=prompt_ids, empty_prompt_row=empty_prompt_row)

    def encode_dataset(self, pipe, dataset, batch_size=64, show_progress=True, flip=False, num_workers=0,
                       empty_prompt=False, **prompt_kwargs) -> EncodedDataset:
        return encode_dataset(pipe, dataset, batch_size=batch_size, show_progress=show_progress, flip=flip,
                              num_workers=num_workers, empty_prompt=empty_prompt)

    def per_sample_loss(self, denoiser, noise_scheduler, latents, conditioning, noise, timesteps):
        """diffusion.per_sample_diffusion_loss; conditioning: the (B, T, D) tensor or {"encoder_hidden_states": it}."""
        states = conditioning["encoder_hidden_states"] if isinstance(conditioning, dict) else conditioning
        return per_sample_diffusion_loss(denoiser, noise_scheduler, latents, states, noise, timesteps,
                                         snr_gamma=self.snr_gamma)


class StableDiffusionXLFamily(_DDPMFamily):
    """StableDiffusionXLPipeline: two CLIP encoders, pooled text embeddings and size/crop time ids."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")

    def encode_prompts(self, pipe, prompts, resolution: int | None = None, **kwargs):
        """{"prompt_embeds": (K, T, D1 + D2), "text_embeds": (K, P) pooled, "time_ids": (K, 6)}.

        time_ids = (R, R, 0, 0, R, R): original size, crop top-left, target size of the training images
        (all resized to resolution R, default the pipeline's default size); the pipeline's own
        encode_prompt and _get_add_time_ids, without classifier-free guidance."""
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=pipe.text_encoder_2.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  **kwargs)
        size = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection)
        return {"prompt_embeds": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(embeds.device).repeat(len(prompts), 1)}

    def per_sample_loss(self, denoiser, noise_scheduler, latents, conditioning, noise, timesteps):
        """DDPM loss (epsilon or v target by the scheduler's prediction_type) with SDXL's added conditions."""
        batch, k = latents.shape[0], multiplicity(latents, noise)
        cond = repeat_conditioning(conditioning, k)
        if k > 1:
            latents = latents.repeat_interleave(k, dim=0)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        dtype = latents.dtype
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        prediction = denoiser(noisy, timesteps, cond["prompt_embeds"].to(dtype), added_cond_kwargs=added).sample
        weights = None if self.snr_gamma is None else min_snr_weights(noise_scheduler, timesteps, self.snr_gamma)
        return mean_squared_error(prediction, target, batch, k, weights)
