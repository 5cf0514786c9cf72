"""Shared fixtures: offline, CPU, small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def public_pipe():
    """The embedded public model, loaded once per test session (do not mutate it in tests)."""
    from peft_dp_saliency.public_model import load_public_pipeline

    pipe = load_public_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def fresh_pipe():
    """A freshly loaded embedded pipeline that a test may modify."""
    from peft_dp_saliency.public_model import load_public_pipeline

    pipe = load_public_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe
