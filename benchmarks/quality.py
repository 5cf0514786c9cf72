#!/usr/bin/env python
"""Results benchmark: every method of the paper's Table 5 through the same training code.

    python benchmarks/quality.py [--jobs 1] [--only DP-SAPF] [--seeds 0 1 2] && python benchmarks/render_results.py
    python benchmarks/quality.py --only "DP-LoRA (q/k/v)" --seeds 1 --epsilons 1   # one row, seed and epsilon
    python benchmarks/quality.py --ablation   # DP-SAPF's ablation, scored on the validation split (tuning)
    python benchmarks/quality.py --decoder_comparison   # the paired refined-vs-first decoder comparison
    python benchmarks/quality.py --guidance_comparison  # the paired guidance-scale comparison (synthesis only)

For each (method, epsilon, seed): examples/train_dp_sapf.py -> examples/synthesize.py -> examples/evaluate.py,
each a subprocess (--jobs in parallel, the machine's cores shared among them: OMP_NUM_THREADS = cores // jobs;
--jobs 1 is the fastest on 2 cores, two one-thread jobs run each stage 3-5x slower). A finished run's JSON in
docs/results/ is not redone (resumable). The scale (SCALE below) is what 2 CPU cores allow; it is written into
every result, and a result made at another scale is refused (archive it first). Same hyperparameters for every method (the library defaults); nothing is tuned on the test split.
Each seed is a fresh run: the DP noise, Poisson sampling and diffusion randomness are fresh by construction
(os.urandom); --seed k changes the data-independent LoRA init and the synthesis seed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
RUNS = ROOT / "runs" / "quality"
SAMPLES = RESULTS / "samples"  # each seed-0 run's sample grid, <slug>.png

SCALE = {
    "max_train_samples": 10000,    # N: the first 10,000 Fashion-MNIST training images
    "expected_batch_size": 256,    # q = 0.0256
    "max_train_steps": 150,
    "learning_rate": 2e-3,
    "rank": 4,
    "clipping": "automatic",       # both stages (the library default)
    "images_per_class": 1000,      # synthetic images per class (10,000 in all; DPImageBench's protocol, scaled)
    "image_mode": "L",             # Fashion-MNIST is grayscale: synthetic PNGs saved as luma (the main job's choice)
    "num_inference_steps": 20,
    # classifier-free guidance at synthesis: 1 = none, chosen on the VALIDATION split by the guidance comparison
    # below (every adapter scored higher at 1 than at synthesize.py's default 4); results made before this key
    # existed were made at 4 (HISTORICAL_SCALE)
    "guidance_scale": 1.0,
    "classifier_epochs": 15,
    "real_test_images": 10000,     # the whole Fashion-MNIST test split: FID reference and accuracy
}
SEEDS = ("0", "1", "2")
EPSILONS = ("10", "1")
CURVE_EPSILONS = ("2", "5")  # the main methods (one seed) and the 400-step pair (seeded), for the curve plot
MORE_DATA = ["--max_train_samples", "50000", "--expected_batch_size", "512", "--max_train_steps", "200"]
LR_5E3 = ["--learning_rate", "5e-3"]
ALL_LINEAR = ["--candidate_pool", "all_linear"]
STEPS_400 = ["--max_train_steps", "400"]  # after MORE_DATA: later flags override earlier ones
DEBIASED_5E3 = "DP-SAPF (ratio 0.5, debiased score), N = 50,000, batch 512 x 200, lr 5e-3"
DEBIASED_ALL_LINEAR_5E3 = "DP-SAPF (all-linear pool, debiased score), N = 50,000, batch 512 x 200, lr 5e-3"
METHODS = {
    "DP-SAPF (ratio 0.3)": [],
    "DP-LoRA (q/k/v)": ["--selection_strategy", "all"],
    "Random selection": ["--selection_strategy", "random"],
    "Layer-level selection": ["--selection_unit", "layer"],
    "DP-SGD w/o LoRA (selected matrices)": ["--no_lora"],
    "DP-LoRA (q/k/v/o)": ["--selection_strategy", "all", "--candidate_pool", "attn_qkvo"],
    # the paper's "All Param." pool: every nn.Linear of the UNet (83 matrices, 3x q/k/v's LoRA parameters),
    # where more noisy coordinates give selection more to save; with DP-LoRA on the same pool
    "DP-SAPF (all-linear pool)": ["--candidate_pool", "all_linear"],
    "DP-LoRA (all linear layers)": ["--selection_strategy", "all", "--candidate_pool", "all_linear"],
    # every Linear and Conv2d (the ResNet blocks hold two thirds of the UNet's weights): LoRA on convolutions
    "DP-SAPF (all-linear+conv pool)": ["--candidate_pool", "all_linear_conv"],
    "DP-LoRA (all linear and conv layers)": ["--selection_strategy", "all", "--candidate_pool", "all_linear_conv"],
    "DP-SAPF (ratio 0.1)": ["--selection_ratio", "0.1"],
    "DP-SAPF (ratio 0.2)": ["--selection_ratio", "0.2"],
    "DP-SAPF (ratio 0.5)": ["--selection_ratio", "0.5"],
    "DP-SGD on LoDA adapters (selected, 003)": ["--adapter", "loda"],
    "DP-SGD on LoDA+ adapters (selected, 003)": ["--adapter", "loda_plus"],
    "Private sparse selection (entries, 004)": ["--selection_unit", "entry"],
    "Private sparse selection (rows, 004)": ["--selection_unit", "row"],
    "DP-SAPF (debiased score)": ["--saliency_score", "debiased"],
    # the main job's shape (batch 512 x 200) on 5x the data: the ablation's best row on the validation split
    "DP-SAPF (ratio 0.3), N = 50,000, batch 512 x 200": MORE_DATA,
    "DP-LoRA (q/k/v), N = 50,000, batch 512 x 200": ["--selection_strategy", "all", *MORE_DATA],
    # the same shape at the learning rate the validation ablation chose (5e-3, the library default since), with
    # DP-SAPF at the ratio that ablation scored level with DP-LoRA (0.5) and at the default ratio (0.3)
    "DP-SAPF (ratio 0.5), N = 50,000, batch 512 x 200, lr 5e-3": [*MORE_DATA, *LR_5E3, "--selection_ratio", "0.5"],
    "DP-LoRA (q/k/v), N = 50,000, batch 512 x 200, lr 5e-3": ["--selection_strategy", "all", *MORE_DATA, *LR_5E3],
    "DP-SAPF (ratio 0.3), N = 50,000, batch 512 x 200, lr 5e-3": [*MORE_DATA, *LR_5E3],
    # the ratio-0.5 row with the debiased score: the norm score's noise term sqrt(d) sigma_s C / (q N) grows with a
    # matrix's size d, so among matrices of different sizes the norm ranks the noise (benchmarks/selection_snr.py:
    # at epsilon 1, 14-15 of the norm's 21 picks are indistinguishable from noise, 5-6 of the debiased score's)
    DEBIASED_5E3: [*MORE_DATA, *LR_5E3, "--selection_ratio", "0.5", "--saliency_score", "debiased"],
    # the paper's "All Param." pool at that shape: at N = 10,000 (seed 0) the query over every Linear picked the
    # feed-forward and time-embedding matrices, no attention at all, and beat both q/k/v rows in FID
    "DP-SAPF (all-linear pool), N = 50,000, batch 512 x 200, lr 5e-3": [*MORE_DATA, *LR_5E3, *ALL_LINEAR],
    "DP-LoRA (all linear layers), N = 50,000, batch 512 x 200, lr 5e-3": ["--selection_strategy", "all",
                                                                          *ALL_LINEAR, *MORE_DATA, *LR_5E3],
    # that DP-SAPF row with the debiased score: over 83 matrices of very different sizes the norm's noise term
    # decides more of the picks (benchmarks/selection_snr.py on its released scores: at epsilon 1, 16 of the
    # norm's 25 picks are indistinguishable from noise, 2 of the debiased score's; at epsilon 10, 6 against 0)
    DEBIASED_ALL_LINEAR_5E3: [*MORE_DATA, *LR_5E3, *ALL_LINEAR, "--saliency_score", "debiased"],
    # the all-linear pair trained twice as long (the validation ablation's "400 steps" row): sigma at epsilon 10
    # rises only from 0.483 to 0.516 for twice the steps, 1.04 to 1.17 at epsilon 1
    "DP-SAPF (all-linear pool), N = 50,000, batch 512 x 400, lr 5e-3": [*MORE_DATA, *LR_5E3, *ALL_LINEAR,
                                                                         *STEPS_400],
    "DP-LoRA (all linear layers), N = 50,000, batch 512 x 400, lr 5e-3": ["--selection_strategy", "all",
                                                                          *ALL_LINEAR, *MORE_DATA, *LR_5E3,
                                                                          *STEPS_400],
}
# DP-SAPF's 400-step row with its picks drawn at random from --seed (data-independent, so the query's share of the
# budget goes to DP-SGD): whether the saliency query's picks beat as many matrices picked blindly from the same pool
RANDOM_400 = "Random selection (all-linear pool), N = 50,000, batch 512 x 400, lr 5e-3"
METHODS[RANDOM_400] = [*METHODS["DP-SAPF (all-linear pool), N = 50,000, batch 512 x 400, lr 5e-3"],
                       "--selection_strategy", "random"]
# the same at ratio 0.55: the query's 25 picks are mostly the larger feed-forward and time-embedding matrices
# (52,224 LoRA parameters at epsilon 10), 25 random ones hold 29,440 on average over seeds 0-4; 46 random ones hold
# 53,589 over seeds 0-2 (47,616, 59,136, 54,016; from the public --seed alone, no data), so this control matches the
# query's parameter count where the one above matches its matrix count
RANDOM_MATCHED_400 = "Random selection at ratio 0.55 (all-linear pool), N = 50,000, batch 512 x 400, lr 5e-3"
METHODS[RANDOM_MATCHED_400] = [*METHODS[RANDOM_400], "--selection_ratio", "0.55"]
# Issue 12's ablation of DP-SAPF at epsilon 10, scored on the VALIDATION split (Fashion-MNIST train images
# 50,000-59,999, never trained on at N <= 50,000) so that choosing defaults from it never reads the test split.
# Later flags override SCALE's (same compute unless the name says otherwise). "defaults" is the table's seed-0
# DP-SAPF adapter and images (the same flags; ablation_plan), only scored again on the validation split.
ABLATION = {
    "defaults": [],
    "EMA 0.99": ["--use_ema", "--ema_decay", "0.99"],
    "K = 4 draws per example (4x compute)": ["--noise_multiplicity", "4"],
    "K = 8 draws per example (8x compute)": ["--noise_multiplicity", "8"],  # issue 12 asks for K in {1, 4, 8}
    "batch 512 x 75 steps (same compute)": ["--expected_batch_size", "512", "--max_train_steps", "75"],
    "batch 128 x 300 steps (same compute)": ["--expected_batch_size", "128", "--max_train_steps", "300"],
    "flat clipping C = 0.05": ["--clipping", "flat", "--selection_clipping", "flat", "--max_grad_norm", "0.05",
                               "--selection_max_grad_norm", "0.05"],
    "selection budget 5%": ["--selection_budget_fraction", "0.05"],
    "selection budget 20%": ["--selection_budget_fraction", "0.2"],
    # the same flags again (fresh DP noise and sampling): the run-to-run spread the rows above are read against
    "a second run of the defaults": [],
    # the levers beyond issue 12's list: at epsilon 10 the private runs trail the non-private one by ~5 points
    # and both are far below real data, so capacity and steps may bind before the DP noise does
    "learning rate 5e-3": ["--learning_rate", "5e-3"],
    "rank 16": ["--rank", "16"],
    "600 steps (4x compute)": ["--max_train_steps", "600"],
    # the DP noise on the mean gradient falls as 1 / batch at a fixed sampling rate q (so at the same sigma):
    # 5x the data and 5x the batch, the most the validation split leaves (images 0-49,999)
    "N = 50,000, batch 1,280 (same q and sigma, 5x compute)": ["--max_train_samples", "50000",
                                                                "--expected_batch_size", "1280"],
    # the main job's choice (N = 60,000 there; 50,000 here so the validation images stay unseen): its batch 512 x
    # 200 steps against a larger batch that still fits its 20 minutes on 2 cores (DP-SGD ~5.8 ms per example)
    "main job's shape: N = 50,000, batch 512 x 200 steps": MORE_DATA,
    "N = 50,000, batch 1,024 x 120 steps (the main job's time budget)": [
        "--max_train_samples", "50000", "--expected_batch_size", "1024", "--max_train_steps", "120"],
    # levers at the main job's shape (against the row above): EMA of the DP iterates (free post-processing:
    # diffusers' EMAModel warms up as (1 + s) / (10 + s), so over 200 steps it averages roughly the last tenth)
    # and a larger learning rate, alone and together (EMA damps the noise a larger step lets in)
    "main job's shape + EMA": [*MORE_DATA, "--use_ema", "--ema_decay", "0.99"],
    "main job's shape + learning rate 5e-3": [*MORE_DATA, "--learning_rate", "5e-3"],
    "main job's shape + learning rate 1e-2": [*MORE_DATA, "--learning_rate", "1e-2"],
    "main job's shape + EMA + learning rate 5e-3": [*MORE_DATA, "--use_ema", "--ema_decay", "0.99",
                                                   "--learning_rate", "5e-3"],
    # on the test split DP-LoRA (every q/k/v) beat DP-SAPF's 30% at this shape: does a larger selected share help?
    "main job's shape + learning rate 5e-3, DP-LoRA (every q/k/v, no query)": [
        *MORE_DATA, "--learning_rate", "5e-3", "--selection_strategy", "all"],
    "main job's shape + learning rate 5e-3 + ratio 0.5": [*MORE_DATA, "--learning_rate", "5e-3",
                                                         "--selection_ratio", "0.5"],
    # the query over every Linear instead of q/k/v (the paper's "All Param." pool): at N = 10,000 on the test split
    # it selected feed-forward and time-embedding matrices and beat both q/k/v rows in FID (seed 0)
    "main job's shape + learning rate 5e-3, all-linear pool": [*MORE_DATA, "--learning_rate", "5e-3", *ALL_LINEAR],
    # that row trained twice as long: at sampling rate 512 / 50,000 doubling the steps raises epsilon 10's DP-SGD
    # sigma only from 0.483 to 0.516 (PLD), so the steps' signal should outgrow their noise (EMA hurt because the
    # 200-step runs are still improving)
    "main job's shape + learning rate 5e-3, all-linear pool, 400 steps (2x compute)": [
        *MORE_DATA, "--learning_rate", "5e-3", *ALL_LINEAR, "--max_train_steps", "400"],
    # the debiased score (||noisy||^2 - d (sigma_s C / (q N))^2) in place of the norm, whose noise term favours large
    # matrices: on the epsilon-10 test runs' paid queries the norm's picks overlapped the debiased top-k in 10 of 13
    "main job's shape + learning rate 5e-3, debiased score": [*MORE_DATA, "--learning_rate", "5e-3",
                                                              "--saliency_score", "debiased"],
    # the adapters see only class prompts, so guidance extrapolates from the public model's unconditional
    # (emoji) prediction (the guidance comparison): train the unconditional prediction too (diffusers' flag)
    "10% empty prompts": ["--proportion_empty_prompts", "0.1"],
    # last: issue 12 measured that C = 1 clips nothing on these gradients and learns little
    "flat clipping C = 1": ["--clipping", "flat", "--selection_clipping", "flat"],
}
# Synthesis settings (post-processing: free in privacy): name -> (the ABLATION variant whose adapter is
# synthesized again, the extra synthesis flags); the same synthesis seed, so each is paired with that variant.
# (Guidance scales of the defaults' adapter are the guidance comparison's, below.)
SYNTHESIS_ABLATION = {
    "RGB images (--image_mode RGB)": ("defaults", ["--image_mode", "RGB"]),
    "50 sampling steps": ("defaults", ["--num_inference_steps", "50"]),
    "the empty-prompt adapter at guidance 2": ("10% empty prompts", ["--guidance_scale", "2"]),
    "the empty-prompt adapter at guidance 4": ("10% empty prompts", ["--guidance_scale", "4"]),
}
NON_PRIVATE = ("LoRA w/o DP (all q/k/v)", ["--selection_strategy", "all"])
# How far this public UNet can be fine-tuned at all at SCALE's compute, without DP: every Linear (attention,
# feed-forward, projections, time embeddings) by the LoRA of "DP-LoRA (all linear layers)", every Linear and
# Conv2d by that of "DP-LoRA (all linear and conv layers)", or the Linears themselves. If these stay near
# NON_PRIVATE, neither the DP noise nor the selection is what limits the private rows.
CEILING = {
    "LoRA w/o DP (all linear layers)": METHODS["DP-LoRA (all linear layers)"],
    "LoRA w/o DP (all linear and conv layers)": METHODS["DP-LoRA (all linear and conv layers)"],
    # AdamW moves every coordinate by ~lr per step: LoRA's 2e-3 on the full matrices would overwrite the public
    # weights (up to ~0.3 in 150 steps), so this row uses a full-fine-tuning learning rate (stated in its name)
    "Fine-tuning w/o DP (all linear layers, no LoRA, lr 2e-4)": ["--selection_strategy", "all", "--candidate_pool",
                                                                 "all_linear", "--no_lora", "--learning_rate", "2e-4"],
}
# The 400-step all-linear pair's epsilon-inf point (the accuracy-vs-epsilon plot at that setting): the same LoRA,
# data, steps and learning rate as its DP-LoRA row, trained without DP, so the gap to it is what DP costs there
NON_PRIVATE_400 = ("LoRA w/o DP (all linear layers), N = 50,000, batch 512 x 400, lr 5e-3",
                   METHODS["DP-LoRA (all linear layers), N = 50,000, batch 512 x 400, lr 5e-3"])
PUBLIC = "Public model (no fine-tuning)"
# Calibration rows: the same classifier and FID on real Fashion-MNIST training images instead of synthetic ones
# (images per class; None = all 60,000), epsilon "real" (no privacy at all).
REAL_CALIBRATION = {"Real training images (100 per class)": 100, "Real training images (1,000 per class)": 1000,
                    "Real training images (all 60,000)": None}
# The ceiling of every latent-diffusion row: as many real images per class as the synthetic rows have, encoded
# (posterior mean) and decoded by the public model's VAE, saved as luma like the synthetic rows. Depends on the
# public model.
AUTOENCODED = (f"Real training images through the public VAE ({SCALE['images_per_class']:,} per class)",
               SCALE["images_per_class"])
# SCALE's entries a real calibration row depends on (it synthesizes nothing); the autoencoded row also on how many
# images it decodes and how they are saved; every other row depends on all
EVALUATION_SCALE = ("classifier_epochs", "real_test_images")
AUTOENCODED_SCALE = (*EVALUATION_SCALE, "images_per_class", "image_mode")
# the value a SCALE key had before it was written into results (synthesize.py's default guidance was 4.0 throughout)
HISTORICAL_SCALE = {"guidance_scale": 4.0}
# The decoder comparison: the seed-0 epsilon-10 adapters (and the public model) synthesized again with the first
# public model's VAE decoder (before examples/refine_public_decoder.py; encoder, UNet and latent space identical),
# same synthesis seed, both scored on the VALIDATION split: paired, and nothing decided from the test split.
PUBLIC_MODEL_V1_COMMIT = "34cd4f8"
PUBLIC_MODEL_V1 = ROOT / "runs" / "public-model-v1"
DECODER_COMPARISON = ("DP-SAPF (ratio 0.3)", "DP-LoRA (q/k/v)", PUBLIC)
# The guidance comparison: seed-0 adapters of the test-split table synthesized again at other classifier-free
# guidance scales (post-processing: free in privacy; 1 = no guidance), same synthesis seed, every scale scored on
# the VALIDATION split (so a synthesis default chosen from it never reads the test split). Why: at guidance 4 the
# non-private conv-pool adapter draws near-copies within a class (mean per-pixel std over a class's images
# 0.05-0.18, against 0.22-0.33 for the private rows, 0.25-0.39 for the public model), a known effect of strong guidance,
# and a classifier trained on near-copies transfers poorly.
GUIDANCE_COMPARISON = {"LoRA w/o DP (all linear and conv layers)": "inf", "DP-SAPF (ratio 0.3)": "10",
                       "DP-LoRA (q/k/v)": "10"}
GUIDANCE_SCALES = ("4", "1", "2")  # SCALE's own scale: the table's images, reused (only re-scored)


def slug(method: str, epsilon: str, seed: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in method.lower().replace("+", "-plus"))
    return f"{'-'.join(filter(None, keep.split('-')))}_eps{epsilon}_seed{seed}"


def public_model_fingerprint(path: Path | None = None) -> str:
    """sha256 (hex, first 16) of the embedded public model's weight files (every *.safetensors, by relative
    path): results made with another public model are stale."""
    from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH

    root, digest = Path(path or EMBEDDED_MODEL_PATH), hashlib.sha256()
    for weights in sorted(root.rglob("*.safetensors")):
        digest.update(str(weights.relative_to(root)).encode())
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def current_public_model() -> str:
    """The embedded public model's fingerprint, hashed once per process (it does not change during a run)."""
    return public_model_fingerprint()


def depends_on_public_model(method: str) -> bool:
    """False only for the pure real-data calibration rows."""
    return method not in REAL_CALIBRATION


def check_current(result_file: Path) -> None:
    """Refuse a finished result made with another public model or at another SCALE (it would be mixed into the
    table)."""
    result = json.loads(result_file.read_text())
    if depends_on_public_model(result["method"]) and result.get("public_model") != current_public_model():
        raise RuntimeError(f"{result_file} was made with another public model ({result.get('public_model')}, now "
                           f"{current_public_model()}): move it to an archive folder or delete it to re-run")
    method = result["method"]
    keys = EVALUATION_SCALE if method in REAL_CALIBRATION else AUTOENCODED_SCALE if method == AUTOENCODED[0] else SCALE
    recorded = {**HISTORICAL_SCALE, **result.get("scale", {})}
    expected = dict(SCALE)
    if ": guidance " in method:  # a guidance-comparison row: made at the scale in its name, by its synthesis flags
        recorded["guidance_scale"] = guidance_of(result.get("synthesis_flags", []), recorded["guidance_scale"])
        expected["guidance_scale"] = float(method.rsplit(" ", 1)[1])
    changed = sorted(k for k in keys if recorded.get(k) != expected[k])
    if changed:
        raise RuntimeError(f"{result_file} was made at another scale ({', '.join(changed)} differ from SCALE): move "
                           "it to an archive folder or delete it to re-run")


def guidance_of(synthesis_flags: list[str], default: float) -> float:
    """The guidance scale a synthesis ran at: the last --guidance_scale among its extra flags, else `default`."""
    values = [synthesis_flags[i + 1] for i, flag in enumerate(synthesis_flags[:-1]) if flag == "--guidance_scale"]
    return float(values[-1]) if values else default


def public_model_v1(target: Path = PUBLIC_MODEL_V1) -> Path:
    """`target` (runs/public-model-v1): the embedded public model as of PUBLIC_MODEL_V1_COMMIT, written once from
    git (the benchmark runs in a clone with its history)."""
    from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH

    if not (target / "model_index.json").exists():
        tree = EMBEDDED_MODEL_PATH.relative_to(ROOT)
        files = subprocess.run(["git", "ls-tree", "-r", "--name-only", PUBLIC_MODEL_V1_COMMIT, str(tree)],
                               cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
        for name in files:
            file = target / Path(name).relative_to(tree)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(subprocess.run(["git", "show", f"{PUBLIC_MODEL_V1_COMMIT}:{name}"], cwd=ROOT,
                                              check=True, capture_output=True).stdout)
    return target


def in_fresh_process(function, *args):
    """function(*args) in a spawned interpreter, so that this process stays small: Linux carries a parent's
    peak RSS into its child's ru_maxrss through fork + exec, so a parent that once held the real training set
    would inflate every later stage's "peak_rss_mb"."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


THREADS_PER_JOB = {"threads": 1}  # set by run_plan: the cores shared among --jobs


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run a subprocess on THREADS_PER_JOB threads; wall seconds and its own peak RSS (os.wait4 rusage, MB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS_PER_JOB["threads"]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    start = time.time()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (status {status}); see {log}")
    return {"seconds": round(time.time() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run_key(method: str, epsilon: str, seed: str, real_split: str = "test") -> str:
    """The run folder's name under runs/quality/ (validation-split runs: ablation-<slug>)."""
    return slug(method, epsilon, seed) if real_split == "test" else f"ablation-{slug(method, epsilon, seed)}"


def adapter_result(adapter_key: str) -> Path:
    """The result file of the run that trained the adapter in runs/quality/<adapter_key> (run_key's inverse)."""
    name = adapter_key.removeprefix("ablation-")
    return (RESULTS if name == adapter_key else RESULTS / "ablation") / f"{name}.json"


def synthetic_folder(key: str, adapter_key: str | None, synthesis_flags: tuple[str, ...]) -> Path:
    """Where a run's images go: its own folder, or (a run reusing another's adapter) the adapter run's folder
    when the synthesis is the same (resumed: not redone), else one named by a hash of the extra flags."""
    if adapter_key is None:
        return RUNS / f"{key}-synthetic"
    if not synthesis_flags:
        return RUNS / f"{adapter_key}-synthetic"
    return RUNS / f"{adapter_key}-synthetic-{hashlib.sha1(' '.join(synthesis_flags).encode()).hexdigest()[:8]}"


_TRAINING_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def training_lock(run_dir: Path) -> threading.Lock:
    """One lock per adapter folder, so that runs sharing an adapter (the synthesis ablation) train it once."""
    with _LOCKS_LOCK:
        return _TRAINING_LOCKS.setdefault(str(run_dir), threading.Lock())


def run_one(method: str, epsilon: str, train_flags: list[str] | None, seed: str = "0",
            real_split: str = "test", synthesis_flags: tuple[str, ...] = (), adapter_key: str | None = None,
            results_subdir: str = "ablation") -> Path:
    """Train (unless public), synthesize, evaluate on `real_split`; write docs/results/<slug>.json (the
    validation-split runs: docs/results/<results_subdir>/<slug>.json, run folders ablation-<slug>).

    `adapter_key` names another run's folder whose adapter is reused (trained there first, with
    `train_flags`, if it is not yet); `synthesis_flags` are appended to examples/synthesize.py's. The seed-0
    run's samples.png and its count of trained parameters are kept in docs/results/ (runs/ is not committed).
    Every result records the public model's fingerprint; a finished one made with another is refused."""
    key = run_key(method, epsilon, seed, real_split)
    result_file = (RESULTS if real_split == "test" else RESULTS / results_subdir) / f"{slug(method, epsilon, seed)}.json"
    if result_file.exists():
        check_current(result_file)
        return result_file
    run_dir, log = RUNS / (adapter_key or key), RUNS / f"{key}.log"
    owner = adapter_result(adapter_key) if adapter_key not in (None, key) else None
    if (owner is not None and owner.exists() and train_flags is not None
            and not (run_dir / "privacy_report.json").exists()):
        raise RuntimeError(f"{method} reuses the adapter {owner} was scored on, but {run_dir} is gone (runs/ is not "
                           "committed): training it again would pair this row with other DP noise. Run both afresh "
                           f"(delete {owner}) or leave this row unrun.")
    RUNS.mkdir(parents=True, exist_ok=True)
    python, stages = sys.executable, {}
    with training_lock(run_dir):
        if train_flags is not None:
            stages["train"] = train(run_dir, epsilon, seed, train_flags, log)
    synthetic = synthetic_folder(key, adapter_key, synthesis_flags)
    if method in REAL_CALIBRATION:
        synthetic = in_fresh_process(write_real_subset, synthetic, REAL_CALIBRATION[method])
    elif method == AUTOENCODED[0]:
        synthetic = in_fresh_process(write_real_subset, synthetic, AUTOENCODED[1], True)
    else:
        stages["synthesis"] = run_measured([
            python, "examples/synthesize.py", "--output_dir", str(synthetic), "--seed", seed,
            "--images_per_class", str(SCALE["images_per_class"]),
            "--num_inference_steps", str(SCALE["num_inference_steps"]), "--image_mode", SCALE["image_mode"],
            "--guidance_scale", str(SCALE["guidance_scale"]),
            *(["--lora_dir", str(run_dir)] if train_flags is not None else _public_prompts()), *synthesis_flags], log)
    metrics_file = RUNS / f"{key}-metrics.json"
    stages["evaluation"] = run_measured([
        python, "examples/evaluate.py", "--synthetic_dir", str(synthetic), "--output_json", str(metrics_file),
        "--epochs", str(SCALE["classifier_epochs"]), "--real_split", real_split], log)
    result = {"method": method, "epsilon": epsilon, "seed": seed, "scale": SCALE, "stages": stages,
              "load_average_at_end": os.getloadavg(), "synthesis_flags": list(synthesis_flags),
              "public_model": current_public_model() if depends_on_public_model(method) else None,
              **json.loads(metrics_file.read_text())}
    if train_flags is not None:
        report = json.loads((run_dir / "privacy_report.json").read_text())
        selection = json.loads((run_dir / "selection.json").read_text())
        timings = Path(f"{run_dir}-work") / "timings.json"
        result.update(privacy=report, selected=selection["selected"],
                      num_candidates=sum(map(len, selection["units"].values())),
                      trained_parameters=trained_parameters(Path(f"{run_dir}-work")),
                      train_timings=json.loads(timings.read_text()) if timings.exists() else None,
                      command=f"python examples/train_dp_sapf.py --target_epsilon {epsilon} "
                              + " ".join(train_flags))
    if seed == "0" and real_split == "test" and method not in REAL_CALIBRATION and method != AUTOENCODED[0]:
        samples = (run_dir if train_flags is not None else synthetic) / (
            "samples.png" if train_flags is not None else "preview_grid.png")
        SAMPLES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples, SAMPLES / f"{slug(method, epsilon, seed)}.png")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    return result_file


def train(run_dir: Path, epsilon: str, seed: str, train_flags: list[str], log: Path) -> dict:
    """examples/train_dp_sapf.py at SCALE into `run_dir` (unless a finished run is there); its wall seconds and
    peak RSS."""
    train_measure = Path(f"{run_dir}-work") / "train_stage.json"
    if (run_dir / "privacy_report.json").exists():  # trained before a restart, or by a run sharing it
        return (json.loads(train_measure.read_text()) if train_measure.exists()
                else {"seconds": None, "peak_rss_mb": None})
    stage = run_measured([
        sys.executable, "examples/train_dp_sapf.py", "--output_dir", str(run_dir), "--overwrite_output_dir",
        "--target_epsilon", epsilon, "--seed", seed, "--num_validation_images", "4",
        "--max_train_samples", str(SCALE["max_train_samples"]),
        "--expected_batch_size", str(SCALE["expected_batch_size"]),
        "--max_train_steps", str(SCALE["max_train_steps"]), "--learning_rate", str(SCALE["learning_rate"]),
        "--rank", str(SCALE["rank"]), "--clipping", SCALE["clipping"],
        "--selection_clipping", SCALE["clipping"], *train_flags], log)
    train_measure.write_text(json.dumps(stage))  # the work folder exists once trained
    return stage


def trained_parameters(work_dir: Path) -> int:
    """Trained coordinates of a run: the entries of its last checkpoint's trainable.safetensors (LoRA A/B,
    LoDA's maps, full matrices, or the sparse runs' masked deltas)."""
    import numpy as np
    from safetensors import safe_open

    checkpoint = max(work_dir.glob("checkpoint-*/trainable.safetensors"), key=lambda p: int(p.parent.name[11:]))
    with safe_open(str(checkpoint), "pt") as f:
        return sum(int(np.prod(f.get_slice(key).get_shape())) for key in f.keys())


def write_real_subset(folder: Path, per_class: int | None, autoencode: bool = False) -> Path:
    """<folder>/gen.npz (DPImageBench's format, read by examples/evaluate.py like a synthetic set): the first
    `per_class` Fashion-MNIST training images of each class (None: all 60,000), at the benchmark's 32 x 32;
    with `autoencode`, each passed through the embedded public VAE and saved as luma (AUTOENCODED)."""
    import numpy as np
    import torch

    from peft_dp_saliency.metrics import load_real

    real = load_real("fashion-mnist", split="train", resolution=32)
    keep = (torch.arange(len(real)) if per_class is None else
            torch.cat([(real.labels == c).nonzero().flatten()[:per_class] for c in range(len(real.class_names))]))
    images = real.images[keep].float() / 255.0  # (n, 3, 32, 32) in [0, 1]
    if autoencode:
        images = autoencoded(images)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "gen.npz", x=images.numpy(), y=real.labels[keep].numpy())
    return folder / "gen.npz"


def autoencoded(images, batch_size: int = 250):
    """(n, 3, R, R) in [0, 1] -> the same images encoded (posterior mean) and decoded by the embedded public VAE,
    then ITU-R 601 luma replicated to 3 channels (what --image_mode L saves), quantised to 8 bits."""
    import torch
    from diffusers import AutoencoderKL

    from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH

    vae = AutoencoderKL.from_pretrained(str(EMBEDDED_MODEL_PATH), subfolder="vae").eval()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for batch in images.split(batch_size):
            decoded = vae.decode(vae.encode(batch * 2 - 1).latent_dist.mean).sample
            gray = ((decoded.clamp(-1, 1) + 1) / 2 * luma).sum(1, keepdim=True)
            out.append((gray * 255).round().div(255).expand(-1, 3, -1, -1))
    return torch.cat(out)


def _public_prompts() -> list[str]:
    from peft_dp_saliency.data import FASHION_MNIST_CLASSES, make_prompts

    names = list(FASHION_MNIST_CLASSES)
    return ["--class_names", *names, "--prompts", *make_prompts(names)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", nargs="+", default=None, help="Run only methods whose name contains one of these texts.")
    p.add_argument("--seeds", nargs="+", default=list(SEEDS), help="Seeds of the seeded main comparison.")
    p.add_argument("--epsilons", nargs="+", default=None,
                   help="Run only items at these epsilons (as the plan writes them: 10, 1, public, real, inf).")
    p.add_argument("--ablation", action="store_true",
                   help="Run the ablation (ABLATION, DP-SAPF at epsilon 10, scored on the validation split) instead.")
    p.add_argument("--decoder_comparison", action="store_true",
                   help="Run the paired decoder comparison (DECODER_COMPARISON, validation split) instead.")
    p.add_argument("--guidance_comparison", action="store_true",
                   help="Run the paired guidance-scale comparison (GUIDANCE_COMPARISON, validation split) instead.")
    args = p.parse_args()
    if args.ablation:
        return run_plan(ablation_plan(), args)
    if args.decoder_comparison:
        return run_plan(decoder_comparison_plan(public_model_v1()), args)
    if args.guidance_comparison:
        return run_plan(guidance_comparison_plan(), args)
    # Order of importance, so an interrupted benchmark still has the main comparison: DP-SAPF vs DP-LoRA
    # at epsilon 10 (seed 0), the references (no training: the public model, the autoencoded ceiling, the real
    # rows), the other epsilon-10 seeds, the non-private
    # run, then epsilon 1, then the non-private ceiling of the linear layers and the all-linear pair at
    # epsilon 10, then the LoDA and sparse-selection rows of the seed papers 003/004, then epsilon 2 and 5
    # (one seed, for the accuracy-vs-epsilon curve), then one seed of every other variant (epsilon 10 first).
    main_methods = ("DP-SAPF (ratio 0.3)", "DP-LoRA (q/k/v)")
    seeds = list(args.seeds)
    plan = [(m, "10", METHODS[m], seed) for seed in seeds[:1] for m in main_methods]
    plan += [(PUBLIC, "public", None, "0")]
    plan += [(name, "real", None, "0") for name in (AUTOENCODED[0], *REAL_CALIBRATION)]
    plan += [(m, "10", METHODS[m], seed) for seed in seeds[1:] for m in main_methods]
    plan += [(NON_PRIVATE[0], "inf", NON_PRIVATE[1], "0")]
    plan += [(m, "1", METHODS[m], seed) for seed in seeds for m in main_methods]
    # the same pair at the main job's shape on 5x the data, seeded too (seed by seed, so an interrupted run
    # stays paired): where the methods separate more than at N = 10,000
    more_data_pair = tuple(m for m in METHODS if m.endswith("N = 50,000, batch 512 x 200"))
    plan += [(m, "10", METHODS[m], seed) for seed in seeds for m in more_data_pair]
    plan += [(m, "1", METHODS[m], seed) for seed in seeds for m in more_data_pair]
    # at lr 5e-3: the epsilon-10 pair seed by seed, then epsilon 1, then DP-SAPF at the default ratio 0.3
    lr_5e3 = tuple(m for m in METHODS if m.endswith("lr 5e-3") and "(all" not in m and m != DEBIASED_5E3)
    plan += [(m, e, METHODS[m], seed) for e in EPSILONS for seed in seeds for m in lr_5e3[:2]]
    plan += [(lr_5e3[2], e, METHODS[lr_5e3[2]], seed) for e in EPSILONS for seed in seeds]
    # epsilon 1 first: where the norm score's picks are mostly noise (the pair above is the comparison)
    plan += [(DEBIASED_5E3, e, METHODS[DEBIASED_5E3], seed) for e in reversed(EPSILONS) for seed in seeds]
    # the all-linear pool at that shape: DP-SAPF against DP-LoRA on the same pool, seed by seed
    all_linear_5e3 = tuple(m for m in METHODS
                           if m.endswith("x 200, lr 5e-3") and "(all" in m and m != DEBIASED_ALL_LINEAR_5E3)
    plan += [(m, e, METHODS[m], seed) for e in EPSILONS for seed in seeds for m in all_linear_5e3]
    # with the debiased score, epsilon 1 first (where the norm's all-linear picks are mostly noise)
    plan += [(DEBIASED_ALL_LINEAR_5E3, e, METHODS[DEBIASED_ALL_LINEAR_5E3], seed) for e in reversed(EPSILONS)
             for seed in seeds]
    # the all-linear pair trained 400 steps, seed by seed, epsilon 10 first
    steps_400 = tuple(m for m in METHODS if "batch 512 x 400" in m and m not in (RANDOM_400, RANDOM_MATCHED_400))
    plan += [(m, e, METHODS[m], seed) for e in EPSILONS for seed in seeds for m in steps_400]
    # its accuracy-vs-epsilon curve (epsilon 5 and 2), the first seed, and its non-private point
    curve_400 = [(m, e, METHODS[m], seed) for seed in seeds for e in reversed(CURVE_EPSILONS) for m in steps_400]
    plan += curve_400[:2 * len(steps_400)]
    plan += [(NON_PRIVATE_400[0], "inf", NON_PRIVATE_400[1], "0")]
    # where the query's picks are least noisy, seed by seed: as many random matrices, then as many parameters
    plan += [(m, "10", METHODS[m], seed) for m in (RANDOM_400, RANDOM_MATCHED_400) for seed in seeds]
    # the curve's other seeds, so that its pairs at epsilon 5 and 2 can be decided too
    plan += curve_400[2 * len(steps_400):]
    plan += [(m, "inf", flags, "0") for m, flags in CEILING.items()]
    all_linear = ("DP-SAPF (all-linear pool)", "DP-LoRA (all linear layers)")
    plan += [(m, "10", METHODS[m], "0") for m in all_linear]
    # the other papers' methods (issue 15), LoDA and sparse entries first
    seed_methods = sorted((m for m in METHODS if "003" in m or "004" in m), key=lambda m: ("+" in m or "rows" in m))
    plan += [(m, e, METHODS[m], "0") for e in EPSILONS for m in seed_methods]
    plan += [(m, e, METHODS[m], "0") for e in CURVE_EPSILONS for m in main_methods]
    planned_all_linear = {(m, "10") for m in all_linear}
    plan += [(m, e, flags, "0") for e in EPSILONS for m, flags in METHODS.items()
             if m not in (*main_methods, *seed_methods, *more_data_pair, *lr_5e3, DEBIASED_5E3, *all_linear_5e3,
                            DEBIASED_ALL_LINEAR_5E3, *steps_400, RANDOM_400, RANDOM_MATCHED_400)
             and (m, e) not in planned_all_linear]
    run_plan(plan, args)


def ablation_plan() -> list[tuple]:
    """ABLATION's runs, each variant followed by SYNTHESIS_ABLATION's runs of its adapter; "defaults" reuses the
    test-split table's seed-0 DP-SAPF adapter and images (same flags), so it is only scored again."""
    adapters = {name: run_key(f"DP-SAPF ablation: {name}", "10", "0", "validation") for name in ABLATION}
    adapters["defaults"] = run_key("DP-SAPF (ratio 0.3)", "10", "0")
    plan = []
    for name, flags in ABLATION.items():
        plan.append((f"DP-SAPF ablation: {name}", "10", flags, "0", "validation", (), adapters[name]))
        plan += [(f"DP-SAPF ablation: {variant}", "10", flags, "0", "validation", tuple(extra), adapters[name])
                 for variant, (adapter, extra) in SYNTHESIS_ABLATION.items() if adapter == name]
    return plan


def decoder_comparison_plan(v1: Path) -> list[tuple]:
    """DECODER_COMPARISON's runs: each adapter (seed 0, epsilon 10; the public model: none) scored on the
    validation split with the current public model and with the one in `v1` (public_model_v1()), into
    docs/results/decoder/."""
    plan = []
    for method in DECODER_COMPARISON:
        epsilon, flags = ("public", None) if method == PUBLIC else ("10", METHODS[method])
        adapter = run_key(method, epsilon, "0")
        for decoder, extra in (("refined decoder", ()),
                               ("public model v1 decoder", ("--pretrained_model_name_or_path", str(v1)))):
            plan.append((f"{method}: {decoder}", epsilon, flags, "0", "validation", extra, adapter, "decoder"))
    return plan


def guidance_comparison_plan() -> list[tuple]:
    """GUIDANCE_COMPARISON's runs: each adapter (seed 0; trained by the main plan, reused) synthesized at each of
    GUIDANCE_SCALES and scored on the validation split, into docs/results/guidance/."""
    plan = []  # scale by scale (4 and 1 of every adapter first: the paired comparison that matters most)
    for scale in GUIDANCE_SCALES:
        for method, epsilon in GUIDANCE_COMPARISON.items():
            flags = {**METHODS, **CEILING}[method]
            extra = () if float(scale) == SCALE["guidance_scale"] else ("--guidance_scale", scale)
            plan.append((f"{method}: guidance {scale}", epsilon, flags, "0", "validation", extra,
                         run_key(method, epsilon, "0"), "guidance"))
    return plan


def run_plan(plan: list[tuple], args) -> None:
    """Run (method, epsilon, flags, seed[, real_split, synthesis_flags, adapter_key]) items (run_one's
    arguments), --jobs at a time; report and go on after a failure."""
    plan = [item for item in plan if (args.only is None or any(text in item[0] for text in args.only))
            and (args.epsilons is None or item[1] in args.epsilons)]
    THREADS_PER_JOB["threads"] = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, *item): item for item in plan}
        for future, (method, epsilon, _, seed, *_) in futures.items():
            try:
                print(f"done: {method} eps={epsilon} seed={seed} -> {future.result()}", flush=True)
            except Exception as error:  # report and continue with the other runs
                print(f"FAILED: {method} eps={epsilon} seed={seed}: {error}", flush=True)


if __name__ == "__main__":
    main()
