"""Frechet distance between Gaussian fits of two feature sets (FID when the features are InceptionV3's)."""

from __future__ import annotations

import torch


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    values = features.double()
    return values.mean(dim=0), torch.cov(values.T)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of features (N_a, D) and (N_b, D).

    Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a S_b, which are real
    and non-negative for covariance matrices (tiny negative or imaginary parts are rounding).
    """
    mean_a, cov_a = gaussian_statistics(features_a)
    mean_b, cov_b = gaussian_statistics(features_b)
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)
