#!/usr/bin/env python
"""SD-1.5 at its real size on CPU: the private step and the selection query against a non-private LoRA step.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/full_size.py [--quick] [--resolutions 256 512]
        [--precisions fp32 bf16] [--batch_size 1]

The UNet is built from Stable Diffusion 1.5's published ``unet/config.json`` (``SD15_UNET_CONFIG``, 859.5M
parameters) with random weights: cost and memory depend on the architecture and the shapes, not on the
values. The text encoder is not run: the cross-attention input is a random (B, 77, 768) tensor, the shape
CLIP ViT-L/14 gives. Per (resolution, precision), on one micro-batch of B examples:

- non-private LoRA step: rank-4 LoRA on every attention q/k/v (DP-LoRA's pool, 96 matrices),
  ``loss.mean().backward()``, AdamW (the baseline);
- DP-SGD LoRA step: the library's ``DPSGDStep`` on the same adapters (per-example joint clipping, noise);
- selection query: ``select_target_modules`` on the same B examples (per-example gradients of all 96
  frozen full matrices, clipped jointly, noised once), before any adapter exists.

bf16 is what diffusers' scripts do with ``--mixed_precision bf16``: frozen weights in bf16, trainable LoRA
weights in fp32, the forward under ``torch.autocast``; clipping and noise stay fp32 (the engine's own rule).
Memory: each method in a forked copy of the set-up process (warm-up call, reset of the RSS high-water
mark, measured call; ``_measure.peak_memory_forked``). Time: ``--repeats`` calls of each method,
interleaved in rotating order after a warm-up (``_measure.time_interleaved``); ratios are paired medians.
Writes docs/benchmarks/full_size.md (``--quick``: a 1/10-width UNet, *_quick.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import warnings
from pathlib import Path

import _measure
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.diffusion import EncodedDataset
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep
from peft_dp_saliency.families import StableDiffusionFamily
from peft_dp_saliency.noise import noise_generator
from peft_dp_saliency.per_sample import use_ghost_norm
from peft_dp_saliency.selection import select_target_modules

# runwayml/stable-diffusion-v1-5, unet/config.json (the fields that shape the network).
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# The same network at 1/10 width (and 1/10 of the text width) for --quick and the test.
QUICK_UNET_CONFIG = {**SD15_UNET_CONFIG, "block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 64,
                     "norm_num_groups": 16, "attention_head_dim": 2}
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon"}
PROMPT_TOKENS = 77  # CLIP's sequence length
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE, DP_STEP, QUERY = "non-private LoRA step", "DP-SGD LoRA step (DPSGDStep)", "selection query"
RANK, SEED = 4, 0
GPU_MEMORY_GB = (24, 40, 80)
warnings.filterwarnings("ignore", message="There are modules in UNet2DConditionModel that should be kept")


def build_unet(config: dict, weight_dtype: torch.dtype) -> UNet2DConditionModel:
    """The UNet from `config` with seeded random weights, frozen, in `weight_dtype`, eval mode (no dropout)."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**config).requires_grad_(False).eval()
    return unet.to(weight_dtype)


def random_examples(config: dict, resolution: int, batch: int) -> EncodedDataset:
    """B examples: (B, 4, r/8, r/8) latents and one (77, cross_attention_dim) text state per example."""
    generator = torch.Generator().manual_seed(SEED)
    side = resolution // 8  # the VAE's downsampling factor
    latents = torch.randn(batch, config["in_channels"], side, side, generator=generator)
    states = torch.randn(batch, PROMPT_TOKENS, config["cross_attention_dim"], generator=generator)
    return EncodedDataset(latents=latents, labels=torch.arange(batch), prompt_embeds=states)


def make_methods(config: dict, resolution: int, precision: str, batch: int) -> tuple[dict, dict]:
    """name -> zero-argument function doing one call of that method; and facts about the set-up."""
    weight_dtype = PRECISIONS[precision]
    family, scheduler = StableDiffusionFamily(), DDPMScheduler(**SD15_SCHEDULER)
    data = random_examples(config, resolution, batch)
    autocast = torch.autocast("cpu", dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    data = EncodedDataset(data.latents.to(weight_dtype), data.labels, data.prompt_embeds.to(weight_dtype))
    unet = build_unet(config, weight_dtype)
    candidates = family.candidates(unet, "attn_qkv")
    facts = {"parameters": sum(p.numel() for p in unet.parameters()), "candidates": len(candidates),
             "candidate_parameters": sum(m.weight.numel() for m in candidates.values()),
             "shapes": candidate_shapes(unet, candidates, data)}
    select_config = SaliencyLoraConfig(r=RANK, lora_alpha=RANK, selection_noise_multiplier=1.0,
                                       selection_sample_rate=1.0, selection_ratio=1.0, selection_seed=SEED)

    def selection_query():
        with autocast:
            select_target_modules(unet, scheduler, data, copy.deepcopy(select_config), batch_size=batch,
                                  show_progress=False, family=family)

    lora_unet = copy.deepcopy(unet)
    lora_unet.add_adapter(SaliencyLoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                             target_modules=list(candidates)))
    cast_training_params(lora_unet, dtype=torch.float32)  # trainable weights fp32, as diffusers does
    lora_unet.train()
    params = [p for p in lora_unet.parameters() if p.requires_grad]
    facts["lora_parameters"] = sum(p.numel() for p in params)
    adamw = torch.optim.AdamW(params, lr=1e-4)
    draws = torch.Generator().manual_seed(SEED)
    settings = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, dataset_size=100 * batch,
                             micro_batch_size=batch, clipping="automatic")
    dp_step = DPSGDStep(lora_unet, scheduler, data, settings, noise_generator("cpu"), draws, family=family)
    indices = torch.arange(batch)

    def non_private():
        latents, states = data.batch(indices)
        noise, timesteps = family.draw_inputs(batch, latents.shape[1:], scheduler, draws, "cpu", latents.dtype)
        with autocast:
            loss = family.per_sample_loss(lora_unet, scheduler, latents, states, noise, timesteps)
        loss.mean().backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    def dp_sgd():
        with autocast:
            dp_step(indices)
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    return {BASELINE: non_private, DP_STEP: dp_sgd, QUERY: selection_query}, facts


def candidate_shapes(unet, candidates: dict, data: EncodedDataset) -> list[dict]:
    """(kind, T, d_in, d_out, count) of the candidates, recorded by hooks in one forward of one example."""
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (inputs[0].shape[-2], module.in_features, module.out_features)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in candidates.items()]
    with torch.no_grad():
        latents, states = data.batch(torch.arange(1))
        unet(latents, torch.zeros(1, dtype=torch.long), states.to(latents.dtype))
    for handle in handles:
        handle.remove()
    rows = {}
    for name, (tokens, d_in, d_out) in seen.items():
        kind = ("self-attn" if ".attn1." in name else "cross-attn") + " " + name.rsplit(".", 1)[-1]
        row = rows.setdefault((kind, tokens, d_in, d_out), {"kind": kind, "tokens": tokens, "d_in": d_in,
                                                             "d_out": d_out, "count": 0})
        row["count"] += 1
    return list(rows.values())


def engine_mib_per_example(tokens: int, d_in: int, d_out: int) -> tuple[str, float]:
    """What the per-sample engine holds per example for one candidate Linear (fp32 MiB):

    the captured input (T d_in) and output gradient (T d_out) in fp32, plus either the materialised
    per-example gradient (d_out d_in) or the two T x T Gram matrices of the ghost norm, whichever the
    engine picks (``per_sample.use_ghost_norm``)."""
    ghost = use_ghost_norm(tokens, d_in, d_out)
    extra = 2 * tokens * tokens if ghost else d_in * d_out
    return ("ghost norm" if ghost else "materialised"), 4 * (tokens * (d_in + d_out) + extra) / 2 ** 20


def measure_config(config: dict, resolution: int, precision: str, batch: int, repeats: int) -> tuple[dict, dict]:
    """Working memory of each method (a forked copy each) and interleaved wall times (``_measure``)."""
    methods, facts = make_methods(config, resolution, precision, batch)
    if repeats:
        results = _measure.measure(methods, repeats)
    else:  # memory only; the time is that of the forked measured call (one sample)
        memory = {name: _measure.peak_memory_forked(fn) for name, fn in methods.items()}
        results = {name: {"memory": m, "wall": [m["seconds"]], "cpu": [m["cpu_seconds"]]}
                   for name, m in memory.items()}
    for name, r in results.items():
        print(f"{resolution}px {precision} B={batch} {name}: median {statistics.median(r['wall']):.2f} s, "
              f"working {r['memory']['working']:.0f} MiB", flush=True)
    return results, facts


def results_table(measured: dict, batch: int) -> str:
    rows = ["| resolution | precision | method | wall s / call (median) | CPU s / call | wall s / example | working MiB "
            "| MiB / example | wall / non-private (paired median) | CPU / non-private (paired median) "
            "| memory / non-private |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (resolution, precision), results in measured.items():
        for name, r in results.items():
            time_ratio, memory_ratio = _measure.ratios(results, name, BASELINE)
            cpu_ratio = _measure.ratios(results, name, BASELINE, times="cpu")[0]
            wall, working = statistics.median(r["wall"]), r["memory"]["working"]
            rows.append(f"| {resolution} px | {precision} | {name} | {wall:.2f} | {statistics.median(r['cpu']):.2f} "
                        f"| {wall / batch:.2f} | {working:.0f} "
                        f"| {working / batch:.0f} | {time_ratio:.2f}x | {cpu_ratio:.2f}x | {memory_ratio:.2f}x |")
    return "\n".join(rows)


def gpu_projection(measured: dict, batch: int, weights_gb: dict) -> str:
    """Micro-batch that fits 24/40/80 GB: (capacity - weights) / working memory per example, measured on CPU."""
    rows = ["| resolution | precision | method | weights GB | GB / example | " +
            " | ".join(f"micro-batch in {gb} GB" for gb in GPU_MEMORY_GB) + " |",
            "|---|---|---|---:|---:|" + "---:|" * len(GPU_MEMORY_GB)]
    for (resolution, precision), results in measured.items():
        for name, r in results.items():
            per_example = r["memory"]["working"] / batch / 1024
            fits = [max(0, math.floor((gb - weights_gb[precision]) / per_example)) for gb in GPU_MEMORY_GB]
            rows.append(f"| {resolution} px | {precision} | {name} | {weights_gb[precision]:.1f} | {per_example:.2f} | "
                        + " | ".join(map(str, fits)) + " |")
    return "\n".join(rows)


def engine_table(shapes_by_resolution: dict[int, list[dict]]) -> str:
    rows = ["| resolution | candidate | count | tokens T | d_in -> d_out | norm by | MiB / example (fp32) |",
            "|---|---|---:|---:|---|---|---:|"]
    for resolution, shapes in shapes_by_resolution.items():
        for r in shapes:
            method, mib = engine_mib_per_example(r["tokens"], r["d_in"], r["d_out"])
            rows.append(f"| {resolution} px | {r['kind']} | {r['count']} | {r['tokens']} | {r['d_in']} -> {r['d_out']} "
                        f"| {method} | {mib:.1f} |")
    return "\n".join(rows)


def write_full_report(output: Path, args, measured: dict, facts: dict, shapes: dict, loads: dict) -> None:
    """docs/benchmarks/full_size.md from what is measured so far."""
    bytes_per = {"fp32": 4, "bf16": 2}
    weights_gb = {p: facts["parameters"] * bytes_per[p] / 1e9 for p in PRECISIONS}
    summary = {f"{res} px {prec}": "DP-SGD / non-private: wall {:.2f}x, CPU {:.2f}x, memory {:.2f}x "
                                   "(load average {:.1f} when measured; {} timed call(s) per method)".format(
        _measure.ratios(r, DP_STEP, BASELINE)[0], _measure.ratios(r, DP_STEP, BASELINE, times="cpu")[0], _measure.ratios(r, DP_STEP, BASELINE)[1],
        *loads[(res, prec)]) for (res, prec), r in measured.items()}
    report_facts = {
        "UNet": f"{'SD-1.5 unet/config.json' if not args.quick else '1/10-width SD-1.5 config'}, random weights, "
                f"{facts['parameters']:,} parameters",
        "adapters": f"LoRA rank {RANK} on all {facts['candidates']} attention q/k/v matrices "
                    f"({facts['lora_parameters']:,} trainable parameters); the selection query covers the same "
                    f"{facts['candidates']} full matrices ({facts['candidate_parameters']:,} weights)",
        "micro-batch": f"B = {args.batch_size} example(s), one (timestep, noise) draw each, 77 text tokens",
        **summary}
    table = results_table(measured, args.batch_size)
    sections = [table, "", "## Memory the per-sample engine adds, per candidate and example (analytic)", "",
                engine_table(shapes), "",
                "## Projection to one GPU (not measured: CPU working memory per example carried over)", "",
                gpu_projection(measured, args.batch_size, weights_gb)]
    notes = _measure.measurement_notes("one call (a step: forward, backward, private gradient, AdamW; the "
                                       "query: forward, backward, clipped sums, noise, scores)") + [
             "projected: micro-batch = floor((GPU GB - UNet weights) / working GB per example); the VAE and "
             "text encoder (~0.4 GB in bf16) are not run in the training loop (the latent cache) and the CUDA "
             "context (~0.5 GB) is not counted; attention on GPU uses SDPA kernels whose memory differs from "
             "CPU's, so read the projection as an order of magnitude.",
             "times are CPU times and do not project to a GPU; the private/non-private ratios are what carries "
             "over approximately (the same kernels run, plus the engine's einsums)."]
    _measure.write_report(output, "SD-1.5 at full size: private step and selection query on CPU",
                          "The real SD-1.5 UNet architecture (random weights) on one micro-batch; see the "
                          "docstring of benchmarks/full_size.py for what each method does.",
                          report_facts, "\n".join(sections), notes)
    print(table, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/10-width UNet at 64 and 128 px (< 1 minute).")
    parser.add_argument("--resolutions", type=int, nargs="+", default=None, help="Default 256 512 (quick: 64 128).")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=1, help="Examples per micro-batch (B).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed calls per method, interleaved; 0: only the forked memory call is timed.")
    parser.add_argument("--output", default=None, help="Default docs/benchmarks/full_size[_quick].md.")
    args = parser.parse_args(argv)
    config = QUICK_UNET_CONFIG if args.quick else SD15_UNET_CONFIG
    resolutions = args.resolutions or ([64, 128] if args.quick else [256, 512])
    output = args.output or _measure.REPO / f"docs/benchmarks/full_size{'_quick' if args.quick else ''}.md"

    # Resumable: each configuration's raw measurements go to <output>.json as it finishes; a configuration
    # already there (same UNet and B) is not measured again. The report is rewritten each time.
    raw_path = Path(output).with_suffix(".json")
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    setup = {"quick": args.quick, "batch_size": args.batch_size}
    if raw.get("setup") != setup:
        raw = {"setup": setup, "configurations": {}}
    for resolution in resolutions:
        for precision in args.precisions:
            key = f"{resolution} {precision}"
            if key not in raw["configurations"]:
                results, facts = measure_config(config, resolution, precision, args.batch_size, args.repeats)
                raw["configurations"][key] = {"results": results, "facts": facts, "repeats": args.repeats,
                                              "load_average": os.getloadavg()}
                raw_path.write_text(json.dumps(raw, indent=1))
            done = {tuple(k.split()): v for k, v in raw["configurations"].items()}
            measured = {(int(res), prec): v["results"] for (res, prec), v in done.items()}
            shapes = {int(res): v["facts"]["shapes"] for (res, _), v in done.items()}
            loads = {(int(res), prec): (v["load_average"][0], v.get("repeats", args.repeats) or "1 (the memory call's)")
                     for (res, prec), v in done.items()}
            write_full_report(Path(output), args, measured, raw["configurations"][key]["facts"], shapes, loads)


if __name__ == "__main__":
    main()
