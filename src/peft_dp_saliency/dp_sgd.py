"""DP-SGD for the trainable matrices (LoRA adapters, selected weights with --no_lora, or the masked
entries of selected weights with --selection_unit entry/row).

One logical step: Poisson-sample each example with probability q (``PoissonSampler``; an empty
batch is a valid step), run it in micro-batches, clip each example's joint gradient over ALL
trainable parameters to C (``PerSampleClipper``), sum, add N(0, (sigma C)^2) once per step
across all processes, divide by q N (the expected batch size, not the realised one), and let
the optimizer (AdamW) step.

Not Opacus' DPOptimizer/DDP wrapper: DDP averages gradients before we could clip, and Opacus'
distributed optimizer adds noise on every rank and scales by world size; here the clipped sums
are all-reduced and noised once (``sum_and_add_noise_once``), which is what the accountant assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .diffusion import EncodedDataset
from .families import StableDiffusionFamily
from .noise import sum_and_add_noise_once
from .per_sample import PerSampleClipper, check_supported
from .sharding import rank_and_world, shard_indices
from .sparse import masks_of


def check_no_dropout(model: nn.Module) -> None:
    """Raise ValueError if `model` has an active dropout (p > 0): its per-example masks would come from torch's
    global generator, which --seed (public) seeds, so they would sit outside the secret mechanism randomness."""
    active = [name for name, module in model.named_modules()
              if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0]
    if active:
        raise ValueError(f"{len(active)} dropout module(s) with p > 0 ({', '.join(active[:3])}"
                         f"{', ...' if len(active) > 3 else ''}): their masks would be drawn from the publicly "
                         "seeded generator; load the model with dropout 0 (e.g. its config's dropout / "
                         "attention_dropout = 0.0)")


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules owning trainable parameters; each must be one the per-sample engine differentiates
    (nn.Linear or nn.Conv2d: LoRA A/B, LoDA maps or selected matrices; ``per_sample.check_supported``)."""
    owners = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            check_supported(name, module)
            owners[name] = module
    if not owners:
        raise ValueError("the model has no trainable parameters: add adapters or unfreeze matrices first")
    return owners


class PoissonSampler:
    """This process's logical batches: `steps` index tensors (int64), each possibly empty.

    Rank r of W owns examples r, r + W, r + 2W, ... (the shards partition range(N)); every step
    each owned example is included independently with probability q, so over all ranks every
    example is included independently w.p. q: one Poisson-sampled batch of the whole dataset.

    Not Opacus' DistributedUniformWithReplacementSampler: it skips a rank's step when that
    rank's share is empty, so ranks fall out of step (a hang at the next all-reduce) and fewer
    steps run than were accounted. Here every rank yields every step, empty or not.
    """

    def __init__(self, dataset_size: int, sample_rate: float, steps: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
        if dataset_size < 1 or not 0 < sample_rate <= 1 or steps < 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid Poisson sampler: N={dataset_size}, q={sample_rate}, steps={steps}, "
                             f"rank={rank}, world_size={world_size}")
        self.shard = shard_indices(dataset_size, rank, world_size)
        self.sample_rate, self.steps, self.generator = sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            # float64: in float32, P(u < q) is off by ~3e-6 relative for q = 256/60000
            mask = torch.rand(len(self.shard), generator=self.generator, dtype=torch.float64) < self.sample_rate
            yield self.shard[mask]


def poisson_sampler(dataset_size: int, sample_rate: float, steps: int,
                    generator: torch.Generator) -> PoissonSampler:
    """The Poisson sampler of THIS process (rank and world size from torch.distributed, if initialised).

    Each rank must pass its own independently seeded generator.
    """
    rank, world = rank_and_world()
    return PoissonSampler(dataset_size, sample_rate, steps, generator, rank, world)


def broadcast_trainable(model: nn.Module) -> None:
    """Copy the main process's trainable parameters to every replica (e.g. after random LoRA init).

    Replicas then stay identical: each step applies the same all-reduced noisy gradient.
    """
    if rank_and_world()[1] > 1:
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)


@dataclass
class DPSGDSettings:
    """noise_multiplier sigma (noise std sigma*C on the summed clipped gradient per step),
    max_grad_norm C (inf = no clipping: the non-private baseline), sample_rate q, dataset_size N,
    micro_batch_size (examples per forward/backward, memory only: never changes the result),
    clipping ("flat" or "automatic", see per_sample), noise_multiplicity K ((timestep, noise) draws
    averaged per example before clipping; K times the compute, free in privacy),
    proportion_empty_prompts p (each example's prompt replaced by "" with probability p per step, drawn
    from the secret diffusion generator: the unconditional branch that classifier-free guidance uses
    learns the data too; the dataset must hold the empty prompt's row)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    dataset_size: int
    micro_batch_size: int
    clipping: str = "flat"
    noise_multiplicity: int = 1
    proportion_empty_prompts: float = 0.0


class DPSGDStep:
    """Computes the private gradient of one logical batch into the trainable parameters' .grad.

    noise_gen draws the DP noise, diffusion_gen each example's (timestep, noise): both are part
    of the mechanism and must be secret (``noise.noise_generator``), never seeded from --seed.
    nonfinite_examples counts examples dropped for a NaN/inf gradient (local logs only).
    """

    def __init__(self, unet, noise_scheduler, data: EncodedDataset, settings: DPSGDSettings,
                 noise_gen: torch.Generator, diffusion_gen: torch.Generator, family=None):
        self.unet, self.noise_scheduler, self.data, self.settings = unet, noise_scheduler, data, settings
        self.modules = trainable_modules(unet)
        self.params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
        clipping = settings.clipping if math.isfinite(settings.max_grad_norm) else "flat"  # inf: no clipping
        # sparse.MaskedLinear: only the masked entries are clipped, noised and stepped (their `delta`)
        self.clipper = PerSampleClipper(self.modules, settings.max_grad_norm, clipping, masks=masks_of(self.modules))
        self.noise_gen, self.diffusion_gen = noise_gen, diffusion_gen
        self.family = family or StableDiffusionFamily()  # the loss and its randomness (families.*)
        self.nonfinite_examples = 0

    def clipped_sum(self, indices: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """Sum of jointly clipped per-sample gradients of `indices` (float32) and the summed loss."""
        sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for name, p in self.params.items()}
        loss_sum = 0.0
        latents_all = self.data.latents
        k = self.settings.noise_multiplicity
        noise, timesteps = self.family.draw_inputs(len(indices) * k, latents_all.shape[1:], self.noise_scheduler,
                                                   self.diffusion_gen, latents_all.device, latents_all.dtype)
        # --random_flip: each example's orientation is one more per-example draw of the secret generator
        flips = None if self.data.flipped_latents is None else \
            torch.rand(len(indices), generator=self.diffusion_gen, device=latents_all.device) < 0.5
        # --proportion_empty_prompts: so is whether each example sees its prompt or "" (a function of its draw only)
        p_empty = self.settings.proportion_empty_prompts
        empty = torch.rand(len(indices), generator=self.diffusion_gen, device=latents_all.device) < p_empty \
            if p_empty else None
        size = self.settings.micro_batch_size
        for start, micro in zip(range(0, len(indices), size), indices.split(size)):
            part = slice(start, start + len(micro))
            latents, states = self.data.batch(micro, None if flips is None else flips[part],
                                              None if empty is None else empty[part])
            with self.clipper.capture():
                rows = slice(start * k, (start + len(micro)) * k)
                loss = self.family.per_sample_loss(self.unet, self.noise_scheduler, latents, states,
                                                   noise[rows], timesteps[rows])
                clipped = self.clipper.clipped_sums(loss)
            for name, value in clipped.sums.items():
                sums[name] += value
            self.nonfinite_examples += clipped.nonfinite
            finite_loss = loss.detach()[torch.isfinite(loss.detach())]
            loss_sum += float(finite_loss.sum())
        return sums, loss_sum

    def __call__(self, indices: torch.Tensor) -> float:
        """Set .grad = (sum of clipped grads + N(0, (sigma C)^2)) / (q N); return this rank's mean loss.

        The loss is computed on sensitive data without noise: it may go to local logs only.
        """
        s = self.settings
        sums, loss_sum = self.clipped_sum(indices)
        std = s.noise_multiplier * s.max_grad_norm if s.noise_multiplier > 0 else 0.0
        sums = sum_and_add_noise_once(sums, std, self.noise_gen)
        expected_batch = s.sample_rate * s.dataset_size
        for name, p in self.params.items():
            p.grad = (sums[name] / expected_batch).to(p.dtype)
        return loss_sum / max(1, len(indices))
