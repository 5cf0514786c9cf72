"""The DP noise: an unpredictable generator and "sum across processes, add noise exactly once".

Opacus' secure mode needs torchcsprng (not packaged for current torch); we seed torch's
generator from os.urandom per run instead, so the noise cannot be derived from --seed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def noise_generator(device: torch.device | str, deterministic_seed: int | None = None) -> torch.Generator:
    """A generator for DP noise: seeded from os.urandom unless a deterministic seed is given (tests only)."""
    seed = deterministic_seed if deterministic_seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def sum_and_add_noise_once(sums: dict[str, torch.Tensor], std: float,
                           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sum `sums` over all processes and add N(0, std^2) to every coordinate exactly once in total.

    The main process adds its noise before the all-reduce, so every replica ends with the same
    tensor: (sum over processes) + one noise draw. Tensors are float32; returned in place.
    """
    is_distributed = dist.is_available() and dist.is_initialized()
    add_here = not is_distributed or dist.get_rank() == 0
    for value in sums.values():
        if add_here and std > 0:
            value.add_(torch.randn(value.shape, generator=generator, device=value.device,
                                   dtype=value.dtype), alpha=std)
        if is_distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return sums
