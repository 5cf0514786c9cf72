"""The mechanisms' randomness: secret generators and "sum across processes, add noise exactly once".

Every random choice inside a mechanism comes from a generator seeded from os.urandom per run
and process: the DP noise, the Poisson sampling, and each example's diffusion timestep and noise
(and any future augmentation). Why a secret sequential stream suffices although draws are handed
out by batch *position*: the draws are i.i.d. and independent of the data, so whichever position an
example lands in, its draw has the same distribution, independent of the other examples' draws.
Adding one example at the front shifts which draw each example gets, but for a secret stream the
joint law of (example, draw) pairs of the common examples is unchanged; coupling them, the clipped
sums differ only by the added example's term (norm <= C), and a mixture over that common law keeps
the Gaussian mechanism's guarantee. If the stream were known (seeded from a released --seed), the
attacker could condition on it and the shift would move every later example's term (the audit
measured 4.46 C for one insertion in 13 examples): hence never from --seed.

Opacus' secure mode needs torchcsprng (not packaged for current torch); torch's Mersenne Twister
seeded from os.urandom is unpredictable from anything released but is not a CSPRNG (see
docs/privacy.md, known limits).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def noise_generator(device: torch.device | str, deterministic_seed: int | None = None) -> torch.Generator:
    """A generator for mechanism randomness: seeded from os.urandom unless a deterministic seed is given
    (tests only: the run is then NOT private). The seed is never written anywhere."""
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
