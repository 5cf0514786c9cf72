"""Per-sample latent-diffusion loss and the encoded (cached) sensitive dataset.

Each cached latent depends on one image only and each prompt embedding on the class prompt
only, so caching them is a per-example preprocessing step that DP-SGD clipping still covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@dataclass
class EncodedDataset:
    """The sensitive dataset as the denoiser sees it.

    latents: (N, C, h, w) VAE latents (posterior mean x scaling_factor), on the data device.
    labels: (N,) int64 class indices.
    prompt_embeds: (K, T, D) text-encoder states of the K class prompts.
    """

    latents: torch.Tensor
    labels: torch.Tensor
    prompt_embeds: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w), encoder_hidden_states (B, T, D)) of the given examples."""
        return self.latents[indices], self.prompt_embeds[self.labels[indices]]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """(K, T, D) text-encoder hidden states of the prompts, padded to the tokenizer's length."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def encode_dataset(pipe, dataset, batch_size: int = 64, show_progress: bool = True) -> EncodedDataset:
    """Encode every image of `dataset` ((image in [-1, 1] (3, R, R), label) items) once.

    Uses the posterior mean, so the cache is deterministic; `dataset.prompts` gives the class prompts.
    """
    vae = pipe.vae
    latents, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, batch_labels in tqdm(loader, desc="encoding images", disable=not show_progress):
        posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        latents.append(posterior.mean * vae.config.scaling_factor)
        labels.append(batch_labels)
    return EncodedDataset(latents=torch.cat(latents), labels=torch.cat(labels).long().to(vae.device),
                          prompt_embeds=encode_prompts(pipe, list(dataset.prompts)))


def draw_diffusion_inputs(num_examples: int, latent_shape: tuple[int, ...], noise_scheduler,
                          generator: torch.Generator | None, device, dtype=torch.float32):
    """Per-example randomness of the loss: noise (B, *latent_shape) and timesteps (B,).

    Drawn once per logical batch, then sliced per micro-batch, so the micro-batch size never
    changes the result.
    """
    noise = torch.randn((num_examples, *latent_shape), generator=generator, device=device, dtype=dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (num_examples,),
                              generator=generator, device=device)
    return noise, timesteps


def per_sample_diffusion_loss(unet, noise_scheduler, latents: torch.Tensor,
                              encoder_hidden_states: torch.Tensor, noise: torch.Tensor,
                              timesteps: torch.Tensor) -> torch.Tensor:
    """(B,) denoising loss of each example, averaged over its K (timestep, noise) draws.

    latents: (B, C, h, w); encoder_hidden_states: (B, T, D); noise: (B K, C, h, w) and timesteps
    (B K,), example-major (rows i K .. i K + K - 1 are example i's draws). K > 1 is noise
    multiplicity (Dockhorn et al., DPDM 2022): the mean over K draws *before* clipping, so still one
    clipped gradient per example. The K copies of an example are consecutive rows, so a per-sample
    engine that reshapes (B K, T, d) to (B, K T, d) sees each example as one with K T tokens (exact).
    Target: the noise or the velocity, by the scheduler's prediction_type, as in diffusers' scripts.
    """
    batch = latents.shape[0]
    if (batch == 0) != (noise.shape[0] == 0) or (batch and noise.shape[0] % batch):
        raise ValueError(f"noise has {noise.shape[0]} rows, not a multiple of the {batch} examples")
    k = noise.shape[0] // batch if batch else 1  # an empty batch is a valid DP-SGD step
    if k > 1:
        latents = latents.repeat_interleave(k, dim=0)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(k, dim=0)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    prediction = unet(noisy, timesteps, encoder_hidden_states.to(latents.dtype)).sample
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1).view(batch, k).mean(1)
