#!/usr/bin/env python
"""Render docs/results.md and docs/results/summary.json from the per-run JSONs of benchmarks/quality.py.

    python benchmarks/render_results.py
"""

from __future__ import annotations

import json
from pathlib import Path

from quality import EPSILONS, METHODS, NON_PRIVATE, PUBLIC, RESULTS, SCALE

from peft_dp_saliency.candidates import block_label, block_order, matrix_label

ROOT = Path(__file__).resolve().parents[1]


def load_runs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*_eps*.json"))]


def summary(runs: list[dict]) -> dict:
    """{method: {epsilon: {"acc", "fid", "fid_features"}}}; epsilon as a string ('inf' non-private)."""
    out: dict = {}
    for run in runs:
        eps = "inf" if run["epsilon"] == "public" else run["epsilon"]
        out.setdefault(run["method"], {})[eps] = {"acc": run["acc"], "fid": run["fid"],
                                                  "fid_features": run["fid_features"]}
    return out


def main_table(table: dict) -> str:
    rows = ["| method | " + " | ".join(f"eps={e}: FID / Acc (%)" for e in EPSILONS) + " |",
            "|---|" + "---|" * len(EPSILONS)]
    for method in METHODS:
        cells = []
        for eps in EPSILONS:
            r = table.get(method, {}).get(eps)
            cells.append(f"{r['fid']:.2f} / {100 * r['acc']:.1f}" if r else "not run")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    for method in (NON_PRIVATE[0], PUBLIC):
        r = table.get(method, {}).get("inf")
        cell = f"{r['fid']:.2f} / {100 * r['acc']:.1f}" if r else "not run"
        rows.append(f"| {method} | " + " | ".join([cell] * len(EPSILONS)) + " (no DP) |")
    return "\n".join(rows)


def selection_table(runs: list[dict], epsilon: str) -> str:
    """Matrices selected per block at each ratio (the paper's Table 7)."""
    ratios = sorted((m for m in METHODS if m.startswith("DP-SAPF")), key=lambda m: float(m.split()[-1][:-1]))
    chosen = {m: next((r["selected"] for r in runs if r["method"] == m and r["epsilon"] == epsilon), None)
              for m in ratios}
    any_run = next((r for r in runs if r.get("selected") is not None), None)
    if any_run is None:
        return "(no runs yet)"
    blocks = sorted({block_label(n) for n in any_run["selected"]} |
                    {block_label(n) for r in runs if r.get("selected") for n in r["selected"]}, key=block_order)
    rows = ["| block | " + " | ".join(m.replace("DP-SAPF ", "") for m in ratios) + " |",
            "|---|" + "---|" * len(ratios)]
    for block in blocks:
        cells = [", ".join(matrix_label(n) for n in chosen[m] if block_label(n) == block) or "-"
                 if chosen[m] is not None else "not run" for m in ratios]
        rows.append(f"| {block} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def compute_table(runs: list[dict], epsilon: str) -> str:
    """Wall time and peak memory per stage (the paper's Table 12)."""
    rows = ["| method | selection s | peak RSS after selection MB | DP-SGD s | peak RSS after DP-SGD MB "
            "| synthesis s | synthesis peak RSS MB | evaluation s |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        if run["epsilon"] != epsilon:
            continue
        t = run.get("train_timings") or {}
        stages = run["stages"]
        rows.append(f"| {run['method']} | {t.get('selection_seconds', 0):.0f} | {t.get('selection_peak_rss_mb', 0):.0f} "
                    f"| {t.get('dp_sgd_seconds', 0):.0f} | {t.get('dp_sgd_peak_rss_mb', 0):.0f} "
                    f"| {stages['synthesis']['seconds']:.0f} | {stages['synthesis']['peak_rss_mb']:.0f} "
                    f"| {stages['evaluation']['seconds']:.0f} |")
    return "\n".join(rows)


def main():
    runs = load_runs()
    table = summary(runs)
    (RESULTS / "summary.json").write_text(json.dumps(table, indent=2))
    features = sorted({r["fid_features"] for r in runs}) or ["(none yet)"]
    sigma = {(r["method"], r["epsilon"]): s["noise_multiplier"] for r in runs
             for s in (r.get("privacy") or {}).get("stages", []) if s["name"] == "dp_sgd"}
    sigma_rows = "\n".join(f"| {m} | {e} | {v:.3g} |" for (m, e), v in sorted(sigma.items()))
    text = f"""# Results on the embedded default (tiny public model, Fashion-MNIST)

Produced by `python benchmarks/quality.py --jobs 2 && python benchmarks/render_results.py`; each run's numbers
are in `docs/results/<method>_eps<epsilon>.json` and the table below is rendered from `docs/results/summary.json`.

**Scale (2 CPU cores, all methods identical, nothing tuned on the test split):** {json.dumps(SCALE)}.
delta = 1/(N ln N); calibration with the PLD accountant; selection noise multiplier 5, C = 1 for both stages;
LoRA alpha = rank; AdamW lr {SCALE['learning_rate']}; seed 0 for data randomness (DP noise from os.urandom).
FID is a Frechet distance in the feature space **{', '.join(features)}** (no InceptionV3 weights offline), against
the {SCALE['real_test_images']} real test images; Acc is the accuracy on the real test split of a ResNet-8 trained on
the synthetic images (epoch picked on a held-out synthetic split).

## FID (lower is better) / downstream accuracy (higher is better)

{main_table(table)}

## Selected matrices per block at epsilon = 10 (paper's Table 7)

{selection_table(runs, "10")}

## Compute per stage at epsilon = 10 (paper's Table 12; wall seconds on 1 thread, peak RSS of the process)

{compute_table(runs, "10")}

## DP-SGD noise multiplier per run

| method | epsilon | sigma |
|---|---|---|
{sigma_rows}
"""
    reading = RESULTS / "reading.md"  # the human reading of these numbers, kept next to them
    if reading.exists():
        text += "\n" + reading.read_text()
    (ROOT / "docs" / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
