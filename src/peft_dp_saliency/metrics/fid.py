"""Frechet distance between Gaussian fits of two feature sets (FID when the features are InceptionV3's)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def gaussian_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    values = features.double().cpu().numpy()
    return values.mean(axis=0), np.cov(values, rowvar=False)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of features (N_a, D) and (N_b, D).

    Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of S_a S_b, which are real
    and non-negative for covariance matrices (tiny negative or imaginary parts are rounding).
    """
    mean_a, cov_a = gaussian_statistics(features_a)
    mean_b, cov_b = gaussian_statistics(features_b)
    eigenvalues = scipy.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))
