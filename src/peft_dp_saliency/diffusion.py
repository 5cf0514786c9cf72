"""Per-sample latent-diffusion loss and the encoded (cached) sensitive dataset.

Each cached latent depends on one image only and each prompt embedding on the class prompt
only, so caching them is a per-example preprocessing step that DP-SGD clipping still covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_snr
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
    flipped_latents: torch.Tensor | None = None  # (N, C, h, w) of the mirrored images (--random_flip)
    prompt_ids: torch.Tensor | None = None  # (N,) int64 row of prompt_embeds per example; None: its label
    empty_prompt_row: int | None = None  # row of prompt_embeds holding the empty prompt "" (--proportion_empty_prompts)

    def __len__(self) -> int:
        return len(self.labels)

    def batch_latents(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) latents of the given examples; flip (B,) bool picks the mirrored image's latents."""
        if flip is None:
            return self.latents[indices]
        if self.flipped_latents is None:
            raise ValueError("flip given but the dataset was encoded without flipped latents")
        return torch.where(flip.view(-1, *[1] * (self.latents.ndim - 1)), self.flipped_latents[indices],
                           self.latents[indices])

    def prompt_rows(self, indices: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) rows of the prompt table the given examples are conditioned on (class or caption);
        empty (B,) bool puts those examples on the empty prompt's row instead."""
        rows = (self.labels if self.prompt_ids is None else self.prompt_ids)[indices]
        if empty is None:
            return rows
        if self.empty_prompt_row is None:
            raise ValueError("empty given but the dataset was encoded without the empty prompt")
        return torch.where(empty.to(rows.device), self.empty_prompt_row, rows)

    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None,
              empty: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, C, h, w), encoder_hidden_states (B, T, D)) of the given examples; flip / empty (B,)
        bool: the mirrored image's latents / the empty prompt for those examples."""
        return self.batch_latents(indices, flip), self.prompt_embeds[self.prompt_rows(indices, empty)]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """(K, T, D) text-encoder hidden states of the prompts, padded to the tokenizer's length."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def encode_dataset(pipe, dataset, batch_size: int = 64, show_progress: bool = True, flip: bool = False,
                   num_workers: int = 0, empty_prompt: bool = False) -> EncodedDataset:
    """Encode every image of `dataset` ((image in [-1, 1] (3, R, R), label) items) once.

    Uses the posterior mean, so the cache is deterministic; `dataset.prompts` gives the class prompts.
    flip: also cache the latents of each image mirrored left-right (--random_flip); num_workers: the
    DataLoader's decoding processes; empty_prompt: also encode "" as the prompt table's last row.
    """
    def encode(images):
        return pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor

    latents, flipped, labels = encode_images(dataset, encode, batch_size, show_progress, flip, num_workers)
    prompts, prompt_ids = prompt_table(dataset, empty_prompt)
    embeds = torch.cat([encode_prompts(pipe, prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    return EncodedDataset(latents=latents, labels=labels, prompt_embeds=embeds, flipped_latents=flipped,
                          prompt_ids=None if prompt_ids is None else prompt_ids.to(latents.device),
                          empty_prompt_row=len(prompts) - 1 if empty_prompt else None)


def prompt_table(dataset, empty_prompt: bool = False) -> tuple[list[str], torch.Tensor | None]:
    """The texts to encode and each example's row among them: the K class prompts (rows: the labels,
    None), or with per-example captions (``dataset.captions``) the distinct captions, sorted, and (N,)
    int64 rows. Captions are sensitive: their embeddings stay in the in-memory cache. empty_prompt: ""
    appended as the last text (no example's row; captions are never empty)."""
    captions = getattr(dataset, "captions", None)
    if captions is None:
        texts, rows = list(dataset.prompts), None
    else:
        texts = sorted(set(captions))
        row = {caption: index for index, caption in enumerate(texts)}
        rows = torch.tensor([row[caption] for caption in captions], dtype=torch.int64)
    return (texts + [""] if empty_prompt else texts), rows


def encode_images(dataset, encode, batch_size: int, show_progress: bool, flip: bool = False, num_workers: int = 0):
    """(latents (N, ...), flipped latents (N, ...) or None, labels (N,) int64) of `dataset` by `encode`
    ((B, 3, R, R) images in [-1, 1] -> latents), in dataset order, on the latents' device."""
    latents, flipped, labels = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, batch_labels in tqdm(loader, desc="encoding images", disable=not show_progress):
        latents.append(encode(images))
        if flip:
            flipped.append(encode(images.flip(-1)))
        labels.append(batch_labels)
    latents = torch.cat(latents)
    return latents, torch.cat(flipped) if flip else None, torch.cat(labels).long().to(latents.device)


def draw_diffusion_inputs(num_examples: int, latent_shape: tuple[int, ...], noise_scheduler,
                          generator: torch.Generator | None, device, dtype=torch.float32, noise_offset: float = 0.0):
    """Per-example randomness of the loss: noise (B, *latent_shape) and timesteps (B,).

    Drawn once per logical batch, then sliced per micro-batch, so the micro-batch size never
    changes the result. noise_offset: diffusers' --noise_offset, noise_offset x N(0, 1) added per
    example and channel (constant over the spatial dims), drawn from the same generator.
    """
    noise = torch.randn((num_examples, *latent_shape), generator=generator, device=device, dtype=dtype)
    if noise_offset:
        offset_shape = (num_examples, latent_shape[0], *[1] * (len(latent_shape) - 1))
        noise = noise + noise_offset * torch.randn(offset_shape, generator=generator, device=device, dtype=dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (num_examples,),
                              generator=generator, device=device)
    return noise, timesteps


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(n,) Min-SNR-gamma loss weights (Hang et al. 2023) of each row's own timestep, as diffusers'
    train_text_to_image_lora.py: min(SNR(t), gamma) / SNR(t) for an epsilon target, / (SNR(t) + 1) for
    v_prediction. A function of one row's timestep only: weighting stays per example."""
    snr = compute_snr(noise_scheduler, timesteps)
    weights = snr.clamp(max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def mean_squared_error(prediction: torch.Tensor, target: torch.Tensor, batch: int, k: int,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float32 MSE per example, averaged over its K draws (before clipping); weights: (B K,) per row."""
    per_row = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_row = per_row * weights
    return per_row.view(batch, k).mean(1)


def per_sample_diffusion_loss(unet, noise_scheduler, latents: torch.Tensor,
                              encoder_hidden_states: torch.Tensor, noise: torch.Tensor,
                              timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """(B,) denoising loss of each example, averaged over its K (timestep, noise) draws.

    latents: (B, C, h, w); encoder_hidden_states: (B, T, D); noise: (B K, C, h, w) and timesteps
    (B K,), example-major (rows i K .. i K + K - 1 are example i's draws). K > 1 is noise
    multiplicity (Dockhorn et al., DPDM 2022): the mean over K draws *before* clipping, so still one
    clipped gradient per example. The K copies of an example are consecutive rows, so a per-sample
    engine that reshapes (B K, T, d) to (B, K T, d) sees each example as one with K T tokens (exact).
    Target: the noise or the velocity, by the scheduler's prediction_type, as in diffusers' scripts;
    snr_gamma: Min-SNR weighting of each row by its own timestep (:func:`min_snr_weights`).
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
    weights = None if snr_gamma is None else min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return mean_squared_error(prediction, target, batch, k, weights)
