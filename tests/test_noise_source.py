"""The DP noise and the Poisson sampling cannot be derived from --seed unless --deterministic_noise
(which the report then declares NOT private)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_dp_saliency.noise import noise_generator
from script_runner import run, training_script

pytestmark = pytest.mark.timeout(300)


def test_noise_generator_is_seeded_from_urandom_unless_a_seed_is_given():
    a, b = (torch.randn(8, generator=noise_generator("cpu")) for _ in range(2))
    assert not torch.equal(a, b)
    c, d = (torch.randn(8, generator=noise_generator("cpu", 3)) for _ in range(2))
    assert torch.equal(c, d)


def released(out, batches) -> dict:
    """What a run released (noisy scores, adapter weights, report) and the batches it sampled."""
    return {"scores": json.loads((out / "selection.json").read_text())["scores"],
            "weights": load_file(str(out / "pytorch_lora_weights.safetensors")),
            "report": json.loads((out / "privacy_report.json").read_text()),
            "batches": list(batches)}


def two_runs(tmp_path, monkeypatch, *flags):
    """Two runs with the same --seed (and flags); records the Poisson batches each sampled."""
    script = training_script()
    original = script.poisson_sampler
    results = []
    for name in ("a", "b"):
        batches = []

        def recording(*args, **kwargs):
            for batch in original(*args, **kwargs):
                batches.append(batch.tolist())
                yield batch

        monkeypatch.setattr(script, "poisson_sampler", recording)
        run(tmp_path / name, "--seed", 1, *flags, samples=16, steps=2, batch=8)
        results.append(released(tmp_path / name, batches))
    return results


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_different_noise_and_sampling(tmp_path, monkeypatch):
    a, b = two_runs(tmp_path, monkeypatch)
    assert a["scores"].keys() == b["scores"].keys()
    assert all(a["scores"][k] != b["scores"][k] for k in a["scores"])  # fresh selection noise
    assert not same_weights(a["weights"], b["weights"])
    assert a["batches"] != b["batches"]  # P(equal by chance) = 2^-32 at q = 0.5, N = 16, 2 steps
    for run_ in (a, b):
        assert run_["report"]["private"] is True
        assert run_["report"]["noise_source"] == "os.urandom-seeded"


def test_deterministic_noise_reproduces_a_run_and_is_reported_not_private(tmp_path, monkeypatch):
    a, b = two_runs(tmp_path, monkeypatch, "--deterministic_noise")
    assert a["scores"] == b["scores"]
    assert same_weights(a["weights"], b["weights"])
    assert a["batches"] == b["batches"]
    for run_ in (a, b):
        assert run_["report"]["private"] is False
        assert run_["report"]["noise_source"].startswith("deterministic (NOT PRIVATE")
