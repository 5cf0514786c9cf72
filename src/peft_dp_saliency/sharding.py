"""Which examples each process owns, and an encoded dataset that holds only those.

Rank r of W owns examples r, r + W, r + 2W, ... (:func:`shard_indices`): the shards partition range(N).
The Poisson sampler of DP-SGD and the selection query take their examples from this one function, so
a rank only ever reads its own shard, and :func:`encode_shard` encodes nothing else (N / W images per
rank instead of N). Indices stay global everywhere: the sampler yields dataset indices and
:class:`ShardedEncodedDataset` maps them to its rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Subset


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed, (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(dataset_size: int, rank: int, world_size: int) -> torch.Tensor:
    """(ceil((N - rank) / W),) int64: the global indices of the examples rank `rank` of `world_size` owns."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} processes")
    return torch.arange(rank, dataset_size, world_size)


class DatasetShard(Subset):
    """The examples of `dataset` that one rank owns, in index order; keeps the class prompts."""

    def __init__(self, dataset, rank: int, world_size: int):
        super().__init__(dataset, shard_indices(len(dataset), rank, world_size).tolist())
        self.prompts = dataset.prompts
        captions = getattr(dataset, "captions", None)  # per-example captions follow their examples
        self.captions = None if captions is None else [captions[i] for i in self.indices]


class ShardedEncodedDataset:
    """An encoded dataset of N examples of which this rank holds only its shard's rows.

    ``len()`` is N (the mechanisms divide by it); ``batch(indices)`` takes global indices of owned
    examples (ValueError otherwise); every other attribute is the shard's (``latents``: (N_r, ...)).
    """

    def __init__(self, shard_data, dataset_size: int, rank: int, world_size: int):
        if len(shard_data) != len(shard_indices(dataset_size, rank, world_size)):
            raise ValueError(f"{len(shard_data)} encoded rows for the shard of rank {rank} / {world_size} of "
                             f"{dataset_size} examples")
        self.shard_data, self.dataset_size, self.rank, self.world_size = shard_data, dataset_size, rank, world_size

    def __len__(self) -> int:
        return self.dataset_size

    def __getattr__(self, name):
        return getattr(self.__dict__["shard_data"], name)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows of the shard that hold the given global indices (which this rank must own)."""
        foreign = ((indices - self.rank) % self.world_size != 0) | (indices < 0) | (indices >= self.dataset_size)
        if foreign.any():
            raise ValueError(f"rank {self.rank} of {self.world_size} does not hold examples {indices[foreign].tolist()}")
        return torch.div(indices - self.rank, self.world_size, rounding_mode="floor")

    def batch(self, indices: torch.Tensor, *args, **kwargs):
        return self.shard_data.batch(self.rows(indices), *args, **kwargs)

    def batch_latents(self, indices: torch.Tensor, *args, **kwargs):
        return self.shard_data.batch_latents(self.rows(indices), *args, **kwargs)


def encode_shard(family, pipe, dataset, **kwargs):
    """``family.encode_dataset`` of this process's shard only (kwargs passed on).

    One process: exactly ``family.encode_dataset(pipe, dataset)`` (same batches, bit-identical). Several:
    a :class:`ShardedEncodedDataset` over the rank's :class:`DatasetShard`.
    """
    rank, world = rank_and_world()
    if world == 1:
        return family.encode_dataset(pipe, dataset, **kwargs)
    encoded = family.encode_dataset(pipe, DatasetShard(dataset, rank, world), **kwargs)
    return ShardedEncodedDataset(encoded, len(dataset), rank, world)
