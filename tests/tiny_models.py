"""Small random denoisers for fast tests (never the shipped model's sizes)."""

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012)


def fixed_inputs(batch: int, seed: int = 0, channels: int = 24):
    """Deterministic (noisy latents, timesteps, text states, targets) for a batch."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 5, channels, generator=g), torch.randn(batch, 4, 8, 8, generator=g))


def per_sample_loss(unet, inputs) -> torch.Tensor:
    """(B,) MSE of the UNet's prediction against fixed targets."""
    noisy, t, states, target = inputs
    return (unet(noisy, t, states).sample - target).pow(2).flatten(1).mean(1)


def tiny_encoded_data(n: int = 12, classes: int = 3, seed: int = 0):
    """An EncodedDataset of random latents for the tiny UNet (cross-attention dim 24)."""
    from peft_dp_saliency.diffusion import EncodedDataset

    g = torch.Generator().manual_seed(seed)
    return EncodedDataset(latents=torch.randn(n, 4, 8, 8, generator=g),
                          labels=torch.arange(n) % classes,
                          prompt_embeds=torch.randn(classes, 5, 24, generator=g))
