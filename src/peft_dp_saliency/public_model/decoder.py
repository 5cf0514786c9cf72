"""Refine the VAE decoder of a latent diffusion pipeline on public images, the encoder frozen.

A latent diffusion model's UNet is trained on its encoder's latents: a new encoder would need a new
UNet, a new decoder does not. Training the decoder alone (and the post-quantisation 1x1 conv in
front of it) therefore sharpens every image the pipeline draws, and every fine-tuned adapter's,
without touching the latent space the UNet and any trained LoRA live in. The encoder and
`quant_conv` are left bit-identical; `vae.config.scaling_factor` is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm


def decoder_parameters(vae: AutoencoderKL) -> list[torch.nn.Parameter]:
    """What decoding a latent depends on: `post_quant_conv` (if the VAE has one) and `decoder`."""
    parts = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    return [p for part in parts for p in part.parameters()]


def refine_decoder(vae: AutoencoderKL, sample_images: Callable[[], torch.Tensor], steps: int,
                   learning_rate: float = 1e-3, generator: torch.Generator | None = None,
                   progress: bool = True) -> list[float]:
    """Train the decoder for `steps` AdamW steps to reconstruct public images from the frozen encoder.

    sample_images() returns a fresh batch (B, C, H, W) in [-1, 1] (C = vae.config.in_channels). Each
    step decodes a posterior sample of the frozen encoder and minimises the pixel MSE, as the VAE's
    own pretraining did (without the KL term, which involves only the encoder). Returns the
    per-step losses (mean squared error per pixel, in [-1, 1] units). The VAE is left in eval mode,
    with requires_grad off.
    """
    vae.requires_grad_(False)
    trainable = decoder_parameters(vae)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    vae.train()
    losses = []
    bar = tqdm(range(steps), desc="decoder", disable=not progress)
    for _ in bar:
        images = sample_images()
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=generator)
        loss = F.mse_loss(vae.decode(latents).sample, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    vae.requires_grad_(False).eval()
    return losses
