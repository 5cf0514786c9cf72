"""benchmarks/full_size.py runs (at 1/10 width) and reports what the engine sees in SD-1.5's layout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def test_the_quick_full_size_benchmark_measures_all_three_methods_and_the_candidate_shapes(tmp_path):
    report = tmp_path / "full_size.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "benchmarks/full_size.py", "--quick", "--resolutions", "64",
                    "--precisions", "fp32", "--output", str(report)], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    text = report.read_text()
    for method in ("non-private LoRA step", "DP-SGD LoRA step (DPSGDStep)", "selection query"):
        assert re.search(rf"\| 64 px \| fp32 \| {re.escape(method)} \| \d+\.\d\d \| \d+\.\d\d \|", text), method
    # SD-1.5's layout: 16 transformer blocks (5 per cross-attention level, 1 in the mid block), q/k/v each
    assert "LoRA rank 4 on all 96 attention q/k/v matrices" in text
    shapes = re.findall(r"\| 64 px \| (self|cross)-attn to_(\w) \| (\d+) \| (\d+) \|", text)
    assert sum(int(count) for *_, count, _ in shapes) == 96
    # cross-attention keys/values see the 77 text tokens; self-attention at level 0 sees (64 / 8)^2 latents
    assert {int(t) for kind, m, _, t in shapes if kind == "cross" and m in "kv"} == {77}
    assert max(int(t) for kind, _, _, t in shapes if kind == "self") == (64 // 8) ** 2
    assert "micro-batch in 24 GB" in text
