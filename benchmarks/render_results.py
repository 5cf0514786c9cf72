#!/usr/bin/env python
"""Render docs/results.md and docs/results/summary.json from the per-run JSONs of benchmarks/quality.py.

    python benchmarks/render_results.py
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
from quality import (ABLATION, AUTOENCODED, CEILING, CURVE_EPSILONS, DECODER_COMPARISON, EPSILONS, GUIDANCE_COMPARISON,
                     GUIDANCE_SCALES, METHODS, NON_PRIVATE, NON_PRIVATE_400, PUBLIC, PUBLIC_MODEL_V1_COMMIT,
                     RANDOM_400, RANDOM_MATCHED_400, REAL_CALIBRATION, RESULTS, SAMPLES, SCALE, SEEDS,
                     SYNTHESIS_ABLATION, check_current, current_public_model, slug)

from peft_dp_saliency.candidates import block_label, block_order, matrix_label

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_100_PER_CLASS = "results/100-per-class/results.md"  # the table at 100 synthetic images per class


def load_runs(folder: Path = RESULTS) -> list[dict]:
    """Every result JSON directly in `folder`; raises if one was made with another public model."""
    paths = sorted(folder.glob("*_eps*_seed*.json"))
    for path in paths:
        check_current(path)
    return [json.loads(p.read_text()) for p in paths]


def summary(runs: list[dict]) -> dict:
    """{method: {epsilon: {"acc", "fid", "fid_features", "acc_std", "fid_std", "seeds"}}}: means over the
    seeds (sample std, 0 for one seed); epsilon as a string ('inf' non-private)."""
    grouped: dict = {}
    for run in runs:
        eps = "inf" if run["epsilon"] in ("public", "real") else run["epsilon"]
        grouped.setdefault(run["method"], {}).setdefault(eps, []).append(run)
    out: dict = {}
    for method, by_eps in grouped.items():
        for eps, group in by_eps.items():
            acc, fid = np.array([r["acc"] for r in group]), np.array([r["fid"] for r in group])
            out.setdefault(method, {})[eps] = {
                "acc": float(acc.mean()), "fid": float(fid.mean()), "fid_features": group[0]["fid_features"],
                "acc_std": float(acc.std(ddof=1)) if len(group) > 1 else 0.0,
                "fid_std": float(fid.std(ddof=1)) if len(group) > 1 else 0.0,
                "seeds": sorted(r.get("seed", "0") for r in group)}
    return out


def cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if len(r["seeds"]) == 1:
        return f"{r['fid']:.2f} / {100 * r['acc']:.1f} (1 seed)"
    return (f"{r['fid']:.2f} ± {r['fid_std']:.2f} / {100 * r['acc']:.1f} ± {100 * r['acc_std']:.1f} "
            f"({len(r['seeds'])} seeds)")


def trainable_parameters(runs: list[dict], method: str, epsilons=EPSILONS) -> str:
    """Trained coordinates of the method's seed-0 run at each of `epsilons`, as its JSON records them
    ("a / b" where the runs differ: another selection trains other matrices)."""
    counts = [run["trained_parameters"] for eps in epsilons for run in runs
              if (run["method"], run["epsilon"], run.get("seed", "0")) == (method, eps, "0")
              and "trained_parameters" in run]
    return " / ".join(f"{n:,}" for n in counts) if len(set(counts)) > 1 else f"{counts[0]:,}" if counts else "?"


def main_table(table: dict, runs: list[dict]) -> str:
    rows = [f"| method | trained parameters (eps {' / '.join(EPSILONS)}) | " + " | ".join(f"eps={e}: FID / Acc (%)" for e in EPSILONS) + " |",
            "|---|---:|" + "---|" * len(EPSILONS)]
    for method in METHODS:
        cells = []
        for eps in EPSILONS:
            cells.append(cell(table.get(method, {}).get(eps)))
        rows.append(f"| {method} | {trainable_parameters(runs, method)} | " + " | ".join(cells) + " |")
    for name in (NON_PRIVATE[0], *CEILING, NON_PRIVATE_400[0]):
        rows.append(f"| {name} | {trainable_parameters(runs, name, ('inf',))} | "
                    + " | ".join([cell(table.get(name, {}).get("inf"))] * len(EPSILONS)) + " (no DP) |")
    rows.append(f"| {PUBLIC} | 0 | " + " | ".join([cell(table.get(PUBLIC, {}).get("inf"))] * len(EPSILONS))
                + " (no DP) |")
    for name in (AUTOENCODED[0], *REAL_CALIBRATION):
        rows.append(f"| {name} | (real data) | " + " | ".join([cell(table.get(name, {}).get("inf"))] * len(EPSILONS))
                    + " (no DP) |")
    return "\n".join(rows)


CURVE_METHODS = ("DP-SAPF (ratio 0.3)", "DP-LoRA (q/k/v)")
# the same pair at the main job's shape on 5x the data (quality.py's seeded N = 50,000 rows)
MORE_DATA_METHODS = tuple(f"{m}, N = 50,000, batch 512 x 200" for m in CURVE_METHODS)
# that shape at lr 5e-3 (the validation ablation's choice), DP-SAPF at ratio 0.5 (level with DP-LoRA there)
LR_5E3_METHODS = ("DP-SAPF (ratio 0.5), N = 50,000, batch 512 x 200, lr 5e-3",
                  "DP-LoRA (q/k/v), N = 50,000, batch 512 x 200, lr 5e-3")
# that shape and lr with the query over every nn.Linear (the paper's "All Param." pool), against LoRA on all of them
ALL_LINEAR_5E3_METHODS = ("DP-SAPF (all-linear pool), N = 50,000, batch 512 x 200, lr 5e-3",
                          "DP-LoRA (all linear layers), N = 50,000, batch 512 x 200, lr 5e-3")
# DP-SAPF there with the debiased score, against the same DP-LoRA
DEBIASED_ALL_LINEAR_5E3_METHODS = ("DP-SAPF (all-linear pool, debiased score), N = 50,000, batch 512 x 200, lr 5e-3",
                                   ALL_LINEAR_5E3_METHODS[1])
# the all-linear pair trained twice as long (400 steps of expected batch 512)
STEPS_400_METHODS = tuple(m.replace("batch 512 x 200", "batch 512 x 400") for m in ALL_LINEAR_5E3_METHODS)


def seeded_comparison(runs: list[dict], first: str = CURVE_METHODS[0], second: str = CURVE_METHODS[1],
                      epsilons: tuple[str, ...] = EPSILONS) -> str:
    """`first` minus `second` at each of `epsilons`, per metric: the seeds' values, the difference of the means
    and Welch's two-sided t-test (scipy; unequal variances), so that "which method wins" is read from the seeds
    and not from the means. Needs >= 2 seeds of each."""
    from scipy.stats import ttest_ind

    rows = ["| epsilon | metric | " + f"{first} (per seed) | {second} (per seed) | difference of means | Welch t | df "
            "| two-sided p |", "|---|---|---|---|---|---|---|---|"]
    for eps in epsilons:
        values = {m: sorted(((r.get("seed", "0"), r) for r in runs if (r["method"], r["epsilon"]) == (m, eps)),
                            key=lambda pair: pair[0]) for m in (first, second)}
        for metric, scale, digits in (("acc", 100, 1), ("fid", 1, 2)):
            a, b = ([scale * r[metric] for _, r in values[m]] for m in (first, second))
            shown = [", ".join(f"{v:.{digits}f}" for v in x) or "not run" for x in (a, b)]
            if min(len(a), len(b)) < 2:
                rows.append(f"| {eps} | {metric} | {shown[0]} | {shown[1]} | | | | needs >= 2 seeds each |")
                continue
            test = ttest_ind(a, b, equal_var=False)
            rows.append(f"| {eps} | {metric} | {shown[0]} | {shown[1]} | {np.mean(a) - np.mean(b):+.{digits}f} "
                        f"| {test.statistic:.2f} | {test.df:.1f} | {test.pvalue:.2f} |")
    return "\n".join(rows)


def accuracy_curve(table: dict, methods: tuple[str, str] = CURVE_METHODS, non_private: str = NON_PRIVATE[0],
                   file_name: str = "accuracy_vs_epsilon.png") -> str:
    """docs/results/<file_name>: downstream accuracy (mean, +- std bars where seeded) of the pair `methods`
    (DP-SAPF, DP-LoRA) at each epsilon run, 'inf' = `non_private` (LoRA without DP), the public model as a dashed
    line. Epsilons not run are left out of the pair's line.

    Drawn with PIL: matplotlib is not a dependency of the project and two polylines do not justify one."""
    from PIL import Image, ImageDraw

    epsilons = sorted({*EPSILONS, *CURVE_EPSILONS}, key=float) + ["inf"]
    width, height, left, bottom, top = 640, 400, 60, 50, 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    accs = [r["acc"] for m in (*methods, non_private, PUBLIC) for r in table.get(m, {}).values()]
    if not accs:
        return ""
    low, high = max(0.0, min(accs) - 0.1), min(1.0, max(accs) + 0.1)
    x_of = {e: left + (i + 0.5) * (width - left - 20) / len(epsilons) for i, e in enumerate(epsilons)}
    y_of = lambda a: top + (high - a) / (high - low) * (height - top - bottom)
    draw.line([(left, top), (left, height - bottom), (width - 10, height - bottom)], fill="black")
    for step in np.arange(np.ceil(low * 10) / 10, high + 1e-9, 0.1):
        draw.text((8, y_of(step) - 6), f"{100 * step:.0f}%", fill="black")
        draw.line([(left - 4, y_of(step)), (left, y_of(step))], fill="black")
    for e, x in x_of.items():
        draw.text((x - 10, height - bottom + 8), f"eps {e}", fill="black")
    public = table.get(PUBLIC, {}).get("inf")
    if public:
        for x in range(left, width - 10, 12):
            draw.line([(x, y_of(public["acc"])), (x + 6, y_of(public["acc"]))], fill="gray")
        draw.text((left + 4, y_of(public["acc"]) + 2), "public model", fill="gray")
    for method, colour, shift in zip(methods, ("blue", "red"), (-4, 4)):
        points = []
        for e in epsilons:
            r = table.get(non_private if e == "inf" else method, {}).get(e)
            if r is None:
                continue
            x, y = x_of[e] + shift, y_of(r["acc"])
            points.append((x, y))
            if r["acc_std"]:
                draw.line([(x, y_of(r["acc"] - r["acc_std"])), (x, y_of(r["acc"] + r["acc_std"]))], fill=colour)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((width - 200, top + 16 * methods.index(method)), method.split(",")[0], fill=colour)
    draw.text((left, height - 18), "downstream accuracy (ResNet-8 on synthetic, tested on real); "
                                   "inf = LoRA without DP", fill="black")
    image.save(RESULTS / file_name)
    return f"![accuracy vs epsilon](results/{file_name})"


def selection_table(runs: list[dict], epsilon: str) -> str:
    """Matrices selected per block at each ratio (the paper's Table 7)."""
    ratios = sorted((m for m in METHODS if m.startswith("DP-SAPF (ratio")),
                    key=lambda m: (float(re.match(r"DP-SAPF \(ratio ([0-9.]+)[,)]", m).group(1)), m))
    chosen = {m: next((r["selected"] for r in runs if r["method"] == m and r["epsilon"] == epsilon
                       and r.get("seed", "0") == "0"), None)
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
        if run["epsilon"] != epsilon or run.get("seed", "0") != "0":
            continue
        t = run.get("train_timings") or {}
        stages = run["stages"]
        rows.append(f"| {run['method']} | {t.get('selection_seconds', 0):.0f} | {t.get('selection_peak_rss_mb', 0):.0f} "
                    f"| {t.get('dp_sgd_seconds', 0):.0f} | {t.get('dp_sgd_peak_rss_mb', 0):.0f} "
                    f"| {stages['synthesis']['seconds']:.0f} | {stages['synthesis']['peak_rss_mb']:.0f} "
                    f"| {stages['evaluation']['seconds']:.0f} |")
    return "\n".join(rows)


def per_class_table(runs: list[dict]) -> str:
    """Accuracy on each real test class of the classifier trained on each run's synthetic set (runs evaluated
    since examples/evaluate.py reports it), in %."""
    rated = [r for r in runs if "per_class_acc" in r.get("downstream", {})]
    if not rated:
        return "(no run evaluated with per-class accuracy yet)"
    classes = list(rated[0]["downstream"]["per_class_acc"])
    rows = ["| run | " + " | ".join(classes) + " | all |", "|---|" + "---:|" * (len(classes) + 1)]
    for r in rated:
        per_class = r["downstream"]["per_class_acc"]
        rows.append(f"| {r['method']} eps {r['epsilon']} seed {r.get('seed', '0')} | "
                    + " | ".join(f"{100 * per_class[c]:.0f}" for c in classes) + f" | {100 * r['acc']:.1f} |")
    return "\n".join(rows)


def ablation_table() -> str:
    """DP-SAPF's ablation at epsilon 10 (quality.py --ablation), scored on the validation split: one row per
    variant, in ABLATION / SYNTHESIS_ABLATION order, with its difference to "defaults"."""
    runs = {r["method"].removeprefix("DP-SAPF ablation: "): r for r in load_runs(RESULTS / "ablation")}
    if not runs:
        return ("(not run on this public model yet: `python benchmarks/quality.py --ablation`; the run on the first "
                "decoder, which chose today's defaults, is in [the archive](results/public-model-v1/results.md))")
    base = runs.get("defaults")
    rows = ["| variant | FID | Acc on validation (%) | vs defaults (points) | DP-SGD sigma | train s | synthesis s |",
            "|---|---|---|---|---|---|---|"]
    for name in (*ABLATION, *SYNTHESIS_ABLATION):
        run = runs.get(name)
        if run is None:
            rows.append(f"| {name} | not run | | | | | |")
            continue
        sigma = next((st["noise_multiplier"] for st in run["privacy"]["stages"] if st["name"] == "dp_sgd"), None)
        train_seconds = run["stages"].get("train", {}).get("seconds")
        # "defaults" reuses the table's seed-0 adapter and images (quality.ablation_plan), the synthesis rows an
        # ablation adapter: their train seconds are that training's
        shared = (f" (the adapter of {SYNTHESIS_ABLATION[name][0]})" if name in SYNTHESIS_ABLATION
                  else " (the table's seed-0 run)" if name == "defaults" else "")
        synthesis = "the table's images" if name == "defaults" else f"{run['stages']['synthesis']['seconds']:.0f}"
        difference = "" if base is None or name == "defaults" else f"{100 * (run['acc'] - base['acc']):+.1f}"
        rows.append(f"| {name} | {run['fid']:.2f} | {100 * run['acc']:.1f} | {difference} | "
                    f"{sigma:.3g} | {train_seconds if train_seconds is not None else '?'}{shared} | {synthesis} |")
    return "\n".join(rows)


def decoder_table() -> str:
    """DECODER_COMPARISON (quality.py, docs/results/decoder/): each adapter's images with the refined and with
    the first public model's VAE decoder, same latents' seed, scored on the validation split."""
    runs = {r["method"]: r for r in load_runs(RESULTS / "decoder")}
    if not runs:
        return (f"(not run at this scale: `python benchmarks/quality.py --decoder_comparison`; the comparison at 100 "
                f"images per class is in [the previous table]({ARCHIVE_100_PER_CLASS}))")
    rows = ["| adapter | refined decoder: FID / Acc (%) | v1 decoder: FID / Acc (%) | Acc refined - v1 (points) |",
            "|---|---|---|---|"]
    for method in DECODER_COMPARISON:
        new, old = runs.get(f"{method}: refined decoder"), runs.get(f"{method}: public model v1 decoder")
        show = lambda r: "not run" if r is None else f"{r['fid']:.2f} / {100 * r['acc']:.1f}"
        gain = "" if new is None or old is None else f"{100 * (new['acc'] - old['acc']):+.1f}"
        label = method if method == PUBLIC else f"{method}, epsilon 10, seed 0"
        rows.append(f"| {label} | {show(new)} | {show(old)} | {gain} |")
    return "\n".join(rows)


def guidance_table() -> str:
    """GUIDANCE_COMPARISON (quality.py, docs/results/guidance/): each seed-0 adapter's images at each guidance
    scale (same synthesis seed), scored on the validation split; recall (the share of real images near a synthetic
    one) is the diversity column."""
    runs = {r["method"]: r for r in load_runs(RESULTS / "guidance")}
    if not runs:
        return "(not run yet: `python benchmarks/quality.py --guidance_comparison`)"
    rows = ["| adapter | " + " | ".join(f"guidance {g}: FID / Acc (%) / recall" for g in GUIDANCE_SCALES) + " |",
            "|---|" + "---|" * len(GUIDANCE_SCALES)]
    for method, epsilon in GUIDANCE_COMPARISON.items():
        cells = [runs.get(f"{method}: guidance {g}") for g in GUIDANCE_SCALES]
        show = lambda r: "not run" if r is None else f"{r['fid']:.2f} / {100 * r['acc']:.1f} / {r['recall']:.2f}"
        rows.append(f"| {method}, epsilon {epsilon}, seed 0 | " + " | ".join(map(show, cells)) + " |")
    return "\n".join(rows)


def side_by_side_samples(runs: list[dict], epsilon: str) -> str:
    """docs/results/samples_eps<epsilon>.png: each seed-0 run's samples.png (kept by quality.py in
    docs/results/samples/) side by side; returns the Markdown that shows it (empty if no run has samples)."""
    from PIL import Image, ImageDraw

    grids = [(r["method"], SAMPLES / f"{slug(r['method'], epsilon, '0')}.png") for r in runs
             if r["epsilon"] == epsilon and r.get("seed", "0") == "0"]
    grids = [(method, Image.open(path).convert("RGB")) for method, path in grids if path.exists()]
    if not grids:
        return ""
    width, height = max(g.width for _, g in grids), max(g.height for _, g in grids)
    # the whole method name, wrapped to the grid's width (PIL's default font: ~6 px a character, 12 px a line), so
    # rows that differ only at the end of their names (200 against 400 steps) stay apart
    titles = [textwrap.wrap(method, max(8, width // 6)) for method, _ in grids]
    header = 12 * max(len(lines) for lines in titles) + 6
    sheet = Image.new("RGB", (len(grids) * (width + 8), height + header), "white")
    for index, ((_, grid), lines) in enumerate(zip(grids, titles)):
        sheet.paste(grid, (index * (width + 8), header))
        ImageDraw.Draw(sheet).multiline_text((index * (width + 8) + 2, 3), "\n".join(lines), fill="black", spacing=2)
    name = f"samples_eps{epsilon}.png"
    sheet.save(RESULTS / name)
    return f"![samples at epsilon {epsilon}, one grid per method (rows = classes)](results/{name})"


def main():
    runs = load_runs()
    table = summary(runs)
    (RESULTS / "summary.json").write_text(json.dumps(table, indent=2))
    features = sorted({r["fid_features"] for r in runs}) or ["(none yet)"]
    sigma = {(r["method"], r["epsilon"]): s["noise_multiplier"] for r in runs if r.get("seed", "0") == "0"
             for s in (r.get("privacy") or {}).get("stages", []) if s["name"] == "dp_sgd"}
    sigma_rows = "\n".join(f"| {m} | {e} | {v:.3g} |" for (m, e), v in sorted(sigma.items()))
    text = f"""# Results on the embedded default (tiny public model, Fashion-MNIST)

Produced by `python benchmarks/quality.py --jobs 1 && python benchmarks/render_results.py`; each run's numbers
are in `docs/results/<method>_eps<epsilon>_seed<k>.json` and the table below is rendered from `docs/results/summary.json`.
Every row was made with the embedded public model whose weights hash to `{current_public_model()}` (the VAE
decoder refined by `examples/refine_public_decoder.py`; quality.py refuses results made with another). The
table before this one (same public model, 100 synthetic images per class) is archived with its JSONs in
[results/100-per-class/]({ARCHIVE_100_PER_CLASS}); the one before it, made with the first decoder (commit
{PUBLIC_MODEL_V1_COMMIT}), in [results/public-model-v1/](results/public-model-v1/results.md).

**Scale (2 CPU cores, all methods identical, nothing tuned on the test split):** {json.dumps(SCALE)}.
delta = 1/(N ln N); calibration with the PLD accountant; automatic clipping (C = 1) for both stages; the selection
query's noise calibrated to take 10% of the budget (the library default); LoRA alpha = rank; AdamW lr
{SCALE['learning_rate']}. Seeded rows give mean ± sample std over seeds {', '.join(SEEDS)} (fresh DP noise,
sampling and diffusion randomness each run, from os.urandom; the seed sets the LoRA init and the synthesis seed);
other rows are one seed. The load average at the end of each run is in its JSON.
FID is a Frechet distance in the feature space **{', '.join(features)}** (no InceptionV3 weights offline), against
the {SCALE['real_test_images']} real test images; Acc is the accuracy on the real test split of a ResNet-8 trained on
the synthetic images (epoch picked on a held-out synthetic split).

## FID (lower is better) / downstream accuracy (higher is better)

{main_table(table, runs)}

Rows "not run" have not been run at this scale yet; their numbers at 100 images per class or with the first
decoder are in the archives above.
"{AUTOENCODED[0]}" is the ceiling of every latent-diffusion row: the same real images encoded and decoded by
the public model's VAE (saved as luma, like the synthetic rows).

## DP-SAPF against DP-LoRA, decided by the seeds

Accuracy in %, FID as above; a difference is only called a win where p < 0.05 (each seed is an independent run).

At N = {SCALE['max_train_samples']:,} (the table's scale):

{seeded_comparison(runs)}

At N = 50,000, expected batch 512 x 200 steps (the main job's shape):

{seeded_comparison(runs, *MORE_DATA_METHODS)}

The same shape at lr 5e-3 (chosen on the validation split), DP-SAPF at ratio 0.5 (chosen there too):

{seeded_comparison(runs, *LR_5E3_METHODS)}

The same shape and lr over every nn.Linear of the UNet (DP-SAPF's query picks from all of them at ratio 0.3; DP-LoRA
trains LoRA on every one):

{seeded_comparison(runs, *ALL_LINEAR_5E3_METHODS)}

The same pair with DP-SAPF's query scored by the debiased squared norm (||noisy||^2 minus its expected noise part) in
place of the norm, whose noise term grows with a matrix's size (benchmarks/selection_snr.py):

{seeded_comparison(runs, *DEBIASED_ALL_LINEAR_5E3_METHODS)}

The all-linear pair trained twice as long (400 steps; DP-SGD sigma 0.516 at epsilon 10 and 1.17 at 1, against 0.483
and 1.04 at 200 steps):

{seeded_comparison(runs, *STEPS_400_METHODS, sorted((*EPSILONS, *CURVE_EPSILONS), key=float))}

DP-SAPF's 400-step row against the same row with as many matrices picked at random from the same pool (from the
public --seed, so no query: its share of the budget goes to DP-SGD), at epsilon 10:

{seeded_comparison(runs, STEPS_400_METHODS[0], RANDOM_400, ("10",))}

The same control with 46 of the 83 matrices (`--selection_ratio 0.55`), which hold about as many LoRA parameters as
the query's 25 picks (47,616, 59,136 and 54,016 in seeds 0-2 against the query's 52,224): as many parameters where
the control above has as many matrices:

{seeded_comparison(runs, STEPS_400_METHODS[0], RANDOM_MATCHED_400, ("10",))}

## Does the refined decoder help? (paired, validation split)

The same adapters' latents (same synthesis seed) decoded by the refined decoder and by the first one (encoder,
UNet and latent space are identical), the classifier tested on Fashion-MNIST training images 50,000-59,999 (never
trained on at N = {SCALE['max_train_samples']:,}), so the choice of decoder is never made on the test split.

{decoder_table()}

## Guidance scale at synthesis (paired, validation split)

The same seed-0 adapters synthesized again (same synthesis seed) at other classifier-free guidance scales, free
in privacy (post-processing; 1 = no guidance; 4 is synthesize.py's default and was the table's until this
comparison, [archived](results/guidance-4/results.md); the table above now uses {SCALE['guidance_scale']:g}), scored
like the decoder comparison on the validation split, so the choice never reads the test split. One seed per cell.

{guidance_table()}

## Which classes each synthetic set teaches (accuracy per real test class, %)

{per_class_table(runs)}

## Accuracy vs epsilon (DP-SAPF and DP-LoRA; bars: +- 1 std over seeds where seeded)

The q/k/v pair at the table's scale (N = {SCALE['max_train_samples']:,}, {SCALE['max_train_steps']} steps of
{SCALE['expected_batch_size']}, lr {SCALE['learning_rate']:g}; inf = {NON_PRIVATE[0]}):

{accuracy_curve(table)}

The all-linear pair at N = 50,000, 400 steps of 512, lr 5e-3, the best private setting (inf = {NON_PRIVATE_400[0]};
epsilons not run are left out):

{accuracy_curve(table, STEPS_400_METHODS, NON_PRIVATE_400[0], "accuracy_vs_epsilon_400_steps.png")}

## Samples at epsilon = 10 (seed 0; each grid: one row per class, from the run's samples.png)

{side_by_side_samples(runs, "10")}

## Selected matrices per block at epsilon = 10 (paper's Table 7)

{selection_table(runs, "10")}

## Compute per stage at epsilon = 10 (paper's Table 12; wall seconds on cores // jobs threads, peak RSS of the process)

{compute_table(runs, "10")}

## Ablation of DP-SAPF at epsilon 10 (one seed, scored on the validation split, never the test split)

`python benchmarks/quality.py --ablation`: the scale above with one change per row; accuracy of the same
ResNet-8 on Fashion-MNIST training images 50,000-59,999 (never trained on at N <= 50,000), FID against them.
"defaults" is the table's seed-0 DP-SAPF adapter and images, scored on this split. The synthesis rows reuse the
adapter named in their train column and its synthesis seed (paired with that row); the others are fresh runs
(fresh DP noise), so their differences include a seed spread of about 2-4 points (the table's 3 seeds: 2.2 std).

{ablation_table()}

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
