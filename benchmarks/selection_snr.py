#!/usr/bin/env python
"""How much of each selection query's score is signal: read the released selection.json of finished runs.

    python benchmarks/selection_snr.py runs/quality/<run>/selection.json [...] [--json docs/results/selection_snr.json]

Every unit's noisy average gradient g + n (n ~ N(0, s^2 I_d), s = sigma_s C / (q N)) has E||g + n||^2 = ||g||^2 + d s^2
and, for small ||g||, std(||n||^2) = sqrt(2 d) s^2. So z = (||g + n||^2 - d s^2) / (sqrt(2 d) s^2) is how many noise
stds a unit's debiased score stands above pure noise (z < 3: indistinguishable from noise). For each file: the
units each score ranks in its top k (k = the run's selection), their overlap, and the z of each score's picks.
Post-processing of what the run released (noisy scores, mechanism): no privacy cost. Unit sizes come from the
embedded public model (the runs of benchmarks/quality.py).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from peft_dp_saliency.public_model import load_public_pipeline
from peft_dp_saliency.sparse import unit_score


def analyse(selection: dict, sizes: dict[str, int]) -> dict:
    """Per-unit squared norms, z and both scores' top-k of one selection.json (unit-level saliency runs only)."""
    m = selection["mechanism"]
    s = m["noise_multiplier"] * m["max_grad_norm"] / (m["sample_rate"] * m["dataset_size"])
    units = {}
    for unit, members in selection["units"].items():
        d = sum(sizes[name] for name in members)
        value = selection["scores"][unit]  # the run's own score: recover ||g + n||^2 from it
        squared = value**2 if selection["score"] == "norm" else value + d * s**2
        units[unit] = {"size": d, "squared_norm": squared,
                       "z": unit_score(squared, d, "debiased", s) / (math.sqrt(2 * d) * s**2)}
    k = len(selection["selected"])
    top = {score: sorted(units, key=lambda u: unit_score(units[u]["squared_norm"], units[u]["size"], score, s),
                         reverse=True)[:k] for score in ("norm", "debiased")}
    return {"pool": selection["pool"], "run_score": selection["score"], "units": len(units), "k": k,
            "noise_std_per_coordinate": s, "overlap": len(set(top["norm"]) & set(top["debiased"])),
            **{f"{score}_top_k_z": sorted((round(units[u]["z"], 1) for u in top[score]), reverse=True)
               for score in top},
            **{f"{score}_top_k_noise_like": sum(units[u]["z"] < 3 for u in top[score]) for score in top}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("selections", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = p.parse_args()
    unet = load_public_pipeline().unet
    sizes = {name: module.weight.numel() for name, module in unet.named_modules() if hasattr(module, "weight")}
    results = {}
    print("| run | pool | k / units | top-k overlap (norm, debiased) | norm's picks with z < 3 | debiased's picks with z < 3 |")
    print("|---|---|---|---|---|---|")
    for path in args.selections:
        selection = json.loads(path.read_text())
        if selection["strategy"] != "saliency" or selection["unit"] != "matrix":
            print(f"| {path.parent.name} | skipped: {selection['strategy']} selection of unit {selection['unit']} | | | | |")
            continue
        r = results[path.parent.name] = analyse(selection, sizes)
        print(f"| {path.parent.name} | {r['pool']} | {r['k']} / {r['units']} | {r['overlap']} / {r['k']} "
              f"| {r['norm_top_k_noise_like']} | {r['debiased_top_k_noise_like']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
