"""Measurement helpers shared by the benchmark scripts (not part of the library).

- one thread per process (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``), set on import;
- the workload: the embedded public model and N encoded Fashion-MNIST examples;
- wall time: all methods in ONE process, interleaved in rotating order; ratios are medians of
  same-round ratios;
- peak memory: each method in its own forked process (a fresh copy of the set-up process):
  after one warm-up call, ``malloc_trim`` and a reset of the kernel's RSS high-water mark
  (``/proc/self/clear_refs``), one measured call; "working memory" = VmHWM - VmRSS before it.
  This sees every torch CPU allocation (tracemalloc does not) and nothing of the set-up.
- the per-sample-gradient alternatives (torch.func, Opacus) and a joint clip shared by both scripts;
- the markdown report and the last line ``time_ratio=... memory_ratio=...``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import ctypes
import gc
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Expected and part of what is measured: Opacus' hooks on frozen inputs; torch.func's per-example
# fallback for CPU flash attention.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Workload:
    """The embedded pipeline (all weights frozen, on CPU), its DDPM scheduler and N encoded examples."""

    pipe: object
    scheduler: object
    data: object  # peft_dp_saliency.diffusion.EncodedDataset


def load_workload(num_examples: int) -> Workload:
    """Embedded public model + the first `num_examples` Fashion-MNIST training images, encoded."""
    from diffusers import DDPMScheduler
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    from peft_dp_saliency.data import load_sensitive_dataset
    from peft_dp_saliency.diffusion import encode_dataset
    from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH, load_public_pipeline

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    pipe = load_public_pipeline(safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    pipe.to("cpu")  # before any adapter is added (opacus#820)
    scheduler = DDPMScheduler.from_pretrained(str(EMBEDDED_MODEL_PATH), subfolder="scheduler")
    data = encode_dataset(pipe, load_sensitive_dataset(max_examples=num_examples), show_progress=False)
    with torch.no_grad():  # one-time kernel set-up, common to every method, before any fork
        latents, states = data.batch(torch.arange(min(2, num_examples)))
        pipe.unet(latents, torch.zeros(len(latents), dtype=torch.long), states)
    return Workload(pipe=pipe, scheduler=scheduler, data=data)


def diffusion_batches(work: Workload, indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """(latents, states, noise, timesteps) per batch of `indices`, drawn as the library draws them."""
    from peft_dp_saliency.diffusion import draw_diffusion_inputs

    for batch in indices.split(batch_size):
        latents, states = work.data.batch(batch)
        noise, timesteps = draw_diffusion_inputs(len(batch), latents.shape[1:], work.scheduler, generator,
                                                 latents.device, latents.dtype)
        yield latents, states, noise, timesteps


# ---------------------------------------------------------------- per-sample-gradient alternatives

def clip_and_sum(per_sample: dict[str, torch.Tensor], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Sum over the batch of per-sample gradients (B, *shape) clipped jointly over all entries to C."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample.values()]).sum(0).sqrt()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {name: torch.einsum("b,b...->...", factors, g) for name, g in per_sample.items()}


def func_per_sample_grads(unet, params: dict[str, torch.Tensor], scheduler, latents, states, noise,
                          timesteps) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients: vmap over the batch of grad(loss of one example) w.r.t. params."""
    from peft_dp_saliency.diffusion import per_sample_diffusion_loss

    def loss_of_one(p, latent, state, eps, t):
        def call(*args):
            return functional_call(unet, p, args)
        return per_sample_diffusion_loss(call, scheduler, latent[None], state[None], eps[None], t[None])[0]

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, 0))(params, latents, states, noise, timesteps)


def opacus_module(unet, loss_reduction: str):
    """Opacus GradSampleModule (hooks on modules with trainable parameters; needs train mode)."""
    from opacus import GradSampleModule

    return GradSampleModule(unet.train(), batch_first=True, loss_reduction=loss_reduction)


# ------------------------------------------------------------------------------------ measurement

def time_interleaved(methods: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each zero-argument method, `repeats` times after one untimed warm-up.

    Rounds rotate the order so that changes in machine load hit every method alike.
    """
    names = list(methods)
    for fn in methods.values():
        fn()
    out = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            methods[name]()
            out[name]["cpu"].append(time.process_time() - cpu)
            out[name]["wall"].append(time.perf_counter() - wall)
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_memory_forked(fn) -> dict[str, float]:
    """Peak RSS (MiB) of `fn()` in a forked copy of this process: warm-up call, trim, reset, measured call.

    Returns baseline (RSS before the measured call), peak (VmHWM during it), working = peak - baseline
    (MiB) and the measured call's wall and process CPU seconds.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        try:
            fn()
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            baseline = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the RSS high-water mark to the current RSS
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
            peak = _status_kib("VmHWM")
            payload = {"baseline": baseline / 1024, "peak": peak / 1024, "working": (peak - baseline) / 1024,
                       "seconds": seconds, "cpu_seconds": cpu_seconds}
        except BaseException:  # report, do not unwind into the parent's code
            payload = {"error": traceback.format_exc()}
        os.write(write_end, json.dumps(payload).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "child died"}')
    if "error" in result:
        raise RuntimeError(f"memory measurement failed in the child:\n{result['error']}")
    return result


def measure(methods: dict, repeats: int) -> dict[str, dict]:
    """Memory of every method (one fork each, before any timing) and interleaved times."""
    gc.collect()
    gc.freeze()  # set-up objects out of the collector's sight: a full collection then costs ~0, not ~0.5 s
    memory = {name: peak_memory_forked(fn) for name, fn in methods.items()}
    times = time_interleaved(methods, repeats)
    return {name: {"memory": memory[name], "wall": times[name]["wall"], "cpu": times[name]["cpu"]}
            for name in methods}


def ratios(results: dict, method: str, baseline: str, times: str = "wall") -> tuple[float, float]:
    """(time, working memory) of `method` relative to `baseline`.

    Time: the median over rounds of the ratio of the two `times` ("wall" seconds, or "cpu" seconds where
    measured) of the same round (paired, so a slow spell of the machine affects both sides of a ratio).
    """
    a, b = results[method], results[baseline]
    return (statistics.median(x / y for x, y in zip(a[times], b[times])),
            a["memory"]["working"] / b["memory"]["working"])


# ---------------------------------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores (load average {load} at the end; other jobs share them), "
            f"1 thread per process, Python {platform.python_version()}, torch {torch.__version__}")


def results_table(results: dict, baseline: str) -> str:
    header = ("| method | wall s (median) | wall s (min) | CPU s (median) | time / baseline (paired median) "
              "| working MiB | peak RSS MiB | memory / baseline |")
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        time_ratio, memory_ratio = ratios(results, name, baseline)
        rows.append(f"| {name} | {statistics.median(r['wall']):.3f} | {min(r['wall']):.3f} "
                    f"| {statistics.median(r['cpu']):.3f} | {time_ratio:.2f}x | {r['memory']['working']:.1f} "
                    f"| {r['memory']['peak']:.0f} | {memory_ratio:.2f}x |")
    return "\n".join(rows)


def measurement_notes(call: str) -> list[str]:
    """How to read a results table; `call` says what one call of a method does."""
    return [f"time: wall seconds of {call}; 'time / baseline' is the median over rounds of the ratio of "
            "the two wall times of the same round. CPU s is process CPU time (less sensitive to the other "
            "jobs on the machine).",
            "memory: each method in its own forked copy of the set-up process; after a warm-up call, "
            "malloc_trim and a reset of the RSS high-water mark, 'working MiB' = VmHWM - VmRSS of the "
            "measured call: everything it allocates, torch included (tracemalloc would miss torch); the "
            "model, the data and optimizer state are in the baseline. 'peak RSS' is the absolute high-water "
            "mark (Python, libraries, every method's model copy, the data)."]


def write_report(path: Path, title: str, intro: str, facts: dict[str, str], table: str,
                 notes: list[str]) -> None:
    """docs/benchmarks/<name>.md: what ran, on what, the table and how to read it."""
    command = " ".join(["OMP_NUM_THREADS=1", ".venv/bin/python", *sys.argv])
    lines = [f"# {title}", "", intro, "", f"Command: `{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in {"machine": machine(), **facts}.items()]
    lines += ["", table, "", *[f"- {note}" for note in notes], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def common_arguments(parser, quick: dict, full: dict, output: Path) -> None:
    """--quick / --num_examples / --batch_size / --repeats / --output, with per-script defaults."""
    parser.add_argument("--quick", action="store_true", help=f"Small run (< 1 minute): {quick}.")
    parser.add_argument("--num_examples", type=int, default=None, help=f"N (default {full['num_examples']}).")
    parser.add_argument("--batch_size", type=int, default=None, help=f"Default {full['batch_size']}.")
    parser.add_argument("--repeats", type=int, default=None, help=f"Timed repeats (default {full['repeats']}).")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"The markdown table (default: {output}; with --quick, *_quick.md beside it, so a "
                             "quick run never replaces the full-run table).")
    parser.set_defaults(default_output=output)


def resolve_sizes(args, quick: dict, full: dict) -> None:
    """Fill unset sizes from the quick or full defaults, and the output path."""
    if args.output is None:
        default = args.default_output
        args.output = default.with_name(f"{default.stem}_quick.md") if args.quick else default
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
