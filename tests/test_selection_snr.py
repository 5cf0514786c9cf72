"""benchmarks/selection_snr.py: the z of a unit's debiased score against pure noise, on a planted query."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from selection_snr import analyse  # noqa: E402


def planted_selection(score: str) -> tuple[dict, dict[str, int]]:
    """Three noise-only matrices of 16,384 coordinates and one of 1,024 with a gradient of norm 0.1, noised as
    the query does (std s per coordinate); k = 1. Returns (selection.json's content, unit sizes)."""
    generator = torch.Generator().manual_seed(0)
    mechanism = {"noise_multiplier": 2.0, "max_grad_norm": 1.0, "sample_rate": 0.1, "dataset_size": 20_000}
    s = 2.0 / (0.1 * 20_000)
    sizes = {"big0": 16_384, "big1": 16_384, "big2": 16_384, "small": 1_024}
    scores = {}
    for name, d in sizes.items():
        signal = torch.full((d,), 0.1 / d**0.5) if name == "small" else torch.zeros(d)
        squared = float((signal + s * torch.randn(d, generator=generator)).pow(2).sum())
        scores[name] = squared**0.5 if score == "norm" else squared - d * s**2
    selection = {"pool": "planted", "score": score, "selected": ["big0"], "mechanism": mechanism,
                 "units": {name: [name] for name in sizes}, "scores": scores}
    return selection, sizes


def test_the_norm_ranks_the_noise_of_a_large_matrix_above_a_small_matrix_with_signal():
    result = analyse(*planted_selection("norm"))
    # the norm's top 1 is a noise-only big matrix (noise norm 0.128 > the small one's ~0.104); the debiased score
    # picks the small one, whose z (~0.01 / (sqrt(2048) 1e-6) = 220) is far above noise
    assert result["overlap"] == 0
    assert result["norm_top_k_noise_like"] == 1 and result["debiased_top_k_noise_like"] == 0
    assert result["debiased_top_k_z"][0] > 100
    assert abs(result["norm_top_k_z"][0]) < 4


def test_the_analysis_reads_a_debiased_run_as_the_same_query():
    norm, debiased = (analyse(*planted_selection(score)) for score in ("norm", "debiased"))
    assert norm["debiased_top_k_z"] == debiased["debiased_top_k_z"]
    assert norm["norm_top_k_z"] == debiased["norm_top_k_z"]
