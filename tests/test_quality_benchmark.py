"""benchmarks/quality.py's plan and its real-data calibration rows (the runs themselves are benchmarks, not tests)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

from peft_dp_saliency.metrics import load_real, load_synthetic  # noqa: E402


def test_every_run_has_its_own_result_file():
    names = [*quality.METHODS, *quality.ABLATION, *quality.SYNTHESIS_ABLATION, *quality.REAL_CALIBRATION,
             quality.NON_PRIVATE[0], quality.PUBLIC]
    slugs = {quality.slug(name, epsilon, seed) for name in names for epsilon in ("1", "10") for seed in quality.SEEDS}
    assert len(slugs) == len(names) * 2 * len(quality.SEEDS)


def test_the_synthesis_ablation_reuses_the_defaults_adapter_after_it_is_trained():
    plan = quality.ablation_plan()
    defaults = quality.run_key("DP-SAPF ablation: defaults", "10", "0", "validation")
    assert plan[0][0] == "DP-SAPF ablation: defaults" and plan[0][2] == []
    synthesis_only = [item for item in plan if len(item) > 5]
    assert len(synthesis_only) == len(quality.SYNTHESIS_ABLATION)
    for method, epsilon, train_flags, seed, split, synthesis_flags, adapter_key in synthesis_only:
        # same training flags as "defaults", so whichever run reaches the adapter first trains the same one
        assert (epsilon, train_flags, seed, split, adapter_key) == ("10", [], "0", "validation", defaults)
        assert synthesis_flags and method.removeprefix("DP-SAPF ablation: ") in quality.SYNTHESIS_ABLATION
    assert all(item[4] == "validation" for item in plan)  # the ablation never reads the test split
    assert quality.training_lock(quality.RUNS / defaults) is quality.training_lock(quality.RUNS / defaults)


def test_real_calibration_subset_is_the_first_images_of_each_class(tmp_path):
    npz = quality.write_real_subset(tmp_path, per_class=3)
    subset = load_synthetic(npz, class_names=load_real("fashion-mnist", split="test").class_names)
    real = load_real("fashion-mnist", split="train")
    assert subset.labels.tolist() == [c for c in range(10) for _ in range(3)]
    first = torch.cat([(real.labels == c).nonzero().flatten()[:3] for c in range(10)])
    assert torch.equal(subset.images, real.images[first])  # bit-exact through gen.npz's float [0, 1]
