"""Improved precision and recall of generative models (Kynkaanniemi et al., 2019).

Each set's manifold is the union of balls around its points with radius the distance to the
point's k-th nearest neighbour in the same set. Precision: the fraction of synthetic points inside
the real manifold; recall: the fraction of real points inside the synthetic manifold.
"""

from __future__ import annotations

import torch


def knn_radii(features: torch.Tensor, k: int = 3, chunk_size: int = 256) -> torch.Tensor:
    """(N,) distance of each of the N points (N, D) to its k-th nearest other point."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} points for k-nearest-neighbour radii, got {len(features)}")
    radii = [torch.cdist(features[start:start + chunk_size], features)
             .topk(k + 1, dim=1, largest=False).values[:, -1]  # the point itself is at distance 0
             for start in range(0, len(features), chunk_size)]
    return torch.cat(radii)


def fraction_in_manifold(points: torch.Tensor, reference: torch.Tensor, radii: torch.Tensor,
                         chunk_size: int = 256) -> float:
    """Fraction of points (M, D) within radii[j] of some reference[j] (reference (N, D), radii (N,))."""
    inside = [(torch.cdist(points[start:start + chunk_size], reference) <= radii).any(dim=1)
              for start in range(0, len(points), chunk_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, synthetic: torch.Tensor, k: int = 3) -> dict[str, float]:
    """{"precision", "recall"} in [0, 1] of synthetic features (M, D) against real features (N, D)."""
    return {"precision": fraction_in_manifold(synthetic, real, knn_radii(real, k)),
            "recall": fraction_in_manifold(real, synthetic, knn_radii(synthetic, k))}
