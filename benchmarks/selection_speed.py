#!/usr/bin/env python
"""Speed and memory of DP-SAPF's private saliency query against one non-private epoch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/selection_speed.py [--quick]

Every method makes one pass over the same N encoded examples of the embedded model, in batches
of the same size, with the same diffusion noise and timesteps:

- non-private epoch: ``loss.mean().backward()`` per batch, the q/k/v candidates' weights
  requiring grad (nothing else), gradients accumulated over the epoch (the baseline);
- saliency query: ``select_target_modules`` (strategy 'saliency'): per-sample gradients of all
  candidates, joint clipping, noise, scores;
- Opacus: ``GradSampleModule`` with only the candidates' weights trainable (per-sample gradients
  materialised for every candidate), the same joint clip, sum and noise;
- torch.func: ``vmap(grad(loss of one example))`` over the candidates' weights, same clip.

The private methods are first checked to release the same per-matrix scores (noise ~ 0) on one
batch. Last line: ``time_ratio=<query/epoch> memory_ratio=<query/epoch>``.
"""

from __future__ import annotations

import argparse
import copy

import _measure
import torch
from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.diffusion import EncodedDataset, per_sample_diffusion_loss
from peft_dp_saliency.noise import noise_generator, sum_and_add_noise_once
from peft_dp_saliency.selection import select_target_modules

QUICK = {"num_examples": 8, "batch_size": 8, "repeats": 9}
FULL = {"num_examples": 512, "batch_size": 64, "repeats": 5}
BASELINE, QUERY = "non-private epoch", "saliency query (DP-SAPF)"
TARGETS = {"time": 2.5, "memory": 1.5}
SEED = 0


def make_methods(work: _measure.Workload, data: EncodedDataset, batch_size: int, noise_multiplier: float,
                 max_grad_norm: float) -> dict:
    """name -> zero-argument function making one pass over `data`; the private ones return
    matrix name -> score (norm of the noisy average clipped gradient)."""
    indices = torch.arange(len(data))
    view = _measure.Workload(pipe=work.pipe, scheduler=work.scheduler, data=data)

    def batches():
        return _measure.diffusion_batches(view, indices, batch_size, torch.Generator().manual_seed(SEED))

    def noisy_scores(sums):
        noisy = sum_and_add_noise_once(sums, noise_multiplier * max_grad_norm, noise_generator("cpu"))
        return {name: float(value.norm()) / len(data) for name, value in noisy.items()}

    epoch_unet = copy.deepcopy(work.pipe.unet)
    for module in find_candidates(epoch_unet).values():
        module.weight.requires_grad_(True)

    def non_private_epoch():
        for latents, states, noise, timesteps in batches():
            per_sample_diffusion_loss(epoch_unet, work.scheduler, latents, states, noise, timesteps).mean().backward()
        epoch_unet.zero_grad(set_to_none=True)

    query_unet = copy.deepcopy(work.pipe.unet)
    config = SaliencyLoraConfig(r=4, selection_strategy="saliency", selection_noise_multiplier=noise_multiplier,
                                selection_max_grad_norm=max_grad_norm, selection_seed=SEED)

    def saliency_query():
        return select_target_modules(query_unet, work.scheduler, data, config, batch_size, show_progress=False).scores

    opacus_unet = copy.deepcopy(work.pipe.unet)
    opacus_candidates = find_candidates(opacus_unet)
    for module in opacus_candidates.values():
        module.weight.requires_grad_(True)
    opacus_model = _measure.opacus_module(opacus_unet, loss_reduction="sum")

    def opacus():
        sums = {name: torch.zeros_like(m.weight) for name, m in opacus_candidates.items()}
        for latents, states, noise, timesteps in batches():
            per_sample_diffusion_loss(opacus_model, work.scheduler, latents, states, noise, timesteps).sum().backward()
            per_sample = {name: m.weight.grad_sample for name, m in opacus_candidates.items()}
            for name, value in _measure.clip_and_sum(per_sample, max_grad_norm).items():
                sums[name] += value
            opacus_model.zero_grad(set_to_none=True)  # also drops grad_sample
        return noisy_scores(sums)

    func_unet = copy.deepcopy(work.pipe.unet)
    func_params = {f"{name}.weight": m.weight.detach() for name, m in find_candidates(func_unet).items()}

    def torch_func():
        sums = {name: torch.zeros_like(w) for name, w in func_params.items()}
        for latents, states, noise, timesteps in batches():
            per_sample = _measure.func_per_sample_grads(func_unet, func_params, work.scheduler, latents, states,
                                                        noise, timesteps)
            for name, value in _measure.clip_and_sum(per_sample, max_grad_norm).items():
                sums[name] += value
        return noisy_scores({name[: -len(".weight")]: value for name, value in sums.items()})

    return {BASELINE: non_private_epoch, QUERY: saliency_query, "Opacus GradSampleModule": opacus,
            "torch.func vmap(grad)": torch_func}


def check_agreement(work: _measure.Workload, batch_size: int, max_grad_norm: float) -> float:
    """Largest relative deviation from the query's scores, on one batch with noise ~ 0."""
    d = work.data
    first = EncodedDataset(latents=d.latents[:batch_size], labels=d.labels[:batch_size], prompt_embeds=d.prompt_embeds)
    methods = make_methods(work, first, batch_size, 1e-9, max_grad_norm)
    methods.pop(BASELINE)
    reference = methods.pop(QUERY)()
    worst = 0.0
    for name, fn in methods.items():
        scores = fn()
        worst = max(worst, max(abs(scores[k] - reference[k]) / reference[k] for k in reference))
    if worst > 1e-3:
        raise AssertionError(f"the per-sample-gradient methods disagree (relative deviation {worst:.2e})")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _measure.common_arguments(parser, QUICK, FULL, _measure.REPO / "docs/benchmarks/selection_speed.md")
    parser.add_argument("--selection_noise_multiplier", type=float, default=5.0)
    parser.add_argument("--selection_max_grad_norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    _measure.resolve_sizes(args, QUICK, FULL)

    work = _measure.load_workload(args.num_examples)
    deviation = check_agreement(work, args.batch_size, args.selection_max_grad_norm)
    methods = make_methods(work, work.data, args.batch_size, args.selection_noise_multiplier,
                           args.selection_max_grad_norm)
    results = _measure.measure(methods, args.repeats)
    time_ratio, memory_ratio = _measure.ratios(results, QUERY, BASELINE)

    candidates = find_candidates(work.pipe.unet)
    facts = {"N": str(args.num_examples), "batch size": str(args.batch_size),
             "timed repeats": f"{args.repeats} per method, interleaved, after one warm-up each",
             "candidates": f"{len(candidates)} q/k/v matrices, "
                           f"{sum(m.weight.numel() for m in candidates.values()):,} weights",
             "agreement": f"private methods' scores within {deviation:.1e} (relative) of the query's on one batch",
             "targets": f"time <= {TARGETS['time']}x, memory <= {TARGETS['memory']}x of the non-private epoch",
             "result": f"time {time_ratio:.2f}x, memory {memory_ratio:.2f}x"}
    notes = _measure.measurement_notes("one pass over the N examples") + [
        "the non-private epoch accumulates .grad of the candidates' weights; no optimizer step."]
    _measure.write_report(args.output, "Saliency query: speed and memory",
                          "DP-SAPF's private saliency query over all q/k/v candidates of the embedded "
                          "model versus one non-private epoch over the same examples.", facts,
                          _measure.results_table(results, BASELINE), notes)
    print(_measure.results_table(results, BASELINE))
    print(f"time_ratio={time_ratio:.3f} memory_ratio={memory_ratio:.3f}")


if __name__ == "__main__":
    main()
