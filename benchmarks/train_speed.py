#!/usr/bin/env python
"""Speed and memory of one DP-SGD step on LoRA adapters against one non-private LoRA step.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_speed.py [--quick] [--targets selected]

The embedded UNet gets LoRA (rank 4) on all q/k/v matrices (DP-LoRA) or on a 30% subset (the
size DP-SAPF selects; chosen at random here, data-independently), after the model is on its device
(opacus#820). Each method is one logical step on the same batch and diffusion noise, on its own
copy of the adapted model, ending with AdamW's step:

- non-private: ``loss.mean().backward()``, AdamW (the baseline);
- DP-SGD: the library's ``DPSGDStep`` (per-sample clipping of the joint LoRA gradient, noise once);
- Opacus: ``GradSampleModule`` on the LoRA-wrapped UNet + ``DPOptimizer`` around the same AdamW;
- torch.func: ``vmap(grad)`` per-sample LoRA gradients, the same clip and noise.

The private methods are first checked to produce the same gradient (noise 0) on the batch.
Last line: ``time_ratio=<dp/non-private> memory_ratio=<dp/non-private>``.
"""

from __future__ import annotations

import argparse
import copy

import _measure
import torch
from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.diffusion import per_sample_diffusion_loss
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep
from peft_dp_saliency.noise import noise_generator, sum_and_add_noise_once
from peft_dp_saliency.selection import select_target_modules

QUICK = {"num_examples": 8, "batch_size": 8, "repeats": 9}
FULL = {"num_examples": 256, "batch_size": 64, "repeats": 9}
BASELINE, DP_STEP = "non-private LoRA step", "DP-SGD step (DPSGDStep)"
TARGETS = {"time": 1.3, "memory": 1.3}
SEED = 0


def add_lora(work: _measure.Workload, targets: str, rank: int) -> list[str]:
    """Add the LoRA adapter to the workload's UNet (already on its device); return its target modules."""
    unet = work.pipe.unet
    config = SaliencyLoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                selection_strategy="all" if targets == "all" else "random", selection_seed=SEED)
    targets = select_target_modules(unet, work.scheduler, None, config, show_progress=False).selected
    unet.add_adapter(config)  # PEFT may rewrite config.target_modules as a minimal set of suffixes
    generator = torch.Generator().manual_seed(SEED)
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # as after some training: with B = 0 the gradient of A vanishes
            param.data.normal_(0.0, 0.01, generator=generator)
    return targets


def make_methods(work: _measure.Workload, batch_size: int, noise_multiplier: float, max_grad_norm: float):
    """name -> (zero-argument function doing one step, its AdamW). Each method owns a model copy."""
    indices = torch.arange(batch_size)
    n = len(work.data)

    def copy_with_adamw():
        unet = copy.deepcopy(work.pipe.unet).train()
        return unet, torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)

    def one_batch(generator):
        return next(_measure.diffusion_batches(work, indices, batch_size, generator))

    methods = {}
    plain_unet, plain_adamw = copy_with_adamw()
    plain_gen = torch.Generator().manual_seed(SEED)

    def non_private():
        latents, states, noise, timesteps = one_batch(plain_gen)
        per_sample_diffusion_loss(plain_unet, work.scheduler, latents, states, noise, timesteps).mean().backward()
        plain_adamw.step()
        plain_adamw.zero_grad(set_to_none=True)
    methods[BASELINE] = (non_private, plain_adamw)

    dp_unet, dp_adamw = copy_with_adamw()
    settings = DPSGDSettings(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             sample_rate=batch_size / n, dataset_size=n, micro_batch_size=batch_size)
    dp_step = DPSGDStep(dp_unet, work.scheduler, work.data, settings, noise_generator("cpu"),
                        torch.Generator().manual_seed(SEED))

    def dp_sgd():
        dp_step(indices)
        dp_adamw.step()
        dp_adamw.zero_grad(set_to_none=True)
    methods[DP_STEP] = (dp_sgd, dp_adamw)

    from opacus.optimizers import DPOptimizer
    opacus_unet, opacus_adamw = copy_with_adamw()
    opacus_model = _measure.opacus_module(opacus_unet, loss_reduction="mean")
    opacus_optimizer = DPOptimizer(opacus_adamw, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                   expected_batch_size=batch_size, loss_reduction="mean")
    opacus_gen = torch.Generator().manual_seed(SEED)

    def opacus():
        latents, states, noise, timesteps = one_batch(opacus_gen)
        per_sample_diffusion_loss(opacus_model, work.scheduler, latents, states, noise, timesteps).mean().backward()
        opacus_optimizer.step()
        opacus_optimizer.zero_grad(set_to_none=True)
    methods["Opacus GradSampleModule + DPOptimizer"] = (opacus, opacus_adamw)

    func_unet, func_adamw = copy_with_adamw()
    func_params = {name: p for name, p in func_unet.named_parameters() if p.requires_grad}
    func_gen, func_noise = torch.Generator().manual_seed(SEED), noise_generator("cpu")

    def torch_func():
        latents, states, noise, timesteps = one_batch(func_gen)
        detached = {name: p.detach() for name, p in func_params.items()}
        per_sample = _measure.func_per_sample_grads(func_unet, detached, work.scheduler, latents, states,
                                                    noise, timesteps)
        sums = sum_and_add_noise_once(_measure.clip_and_sum(per_sample, max_grad_norm),
                                      noise_multiplier * max_grad_norm, func_noise)
        for name, p in func_params.items():
            p.grad = sums[name] / batch_size
        func_adamw.step()
        func_adamw.zero_grad(set_to_none=True)
    methods["torch.func vmap(grad)"] = (torch_func, func_adamw)
    return methods


def check_agreement(work: _measure.Workload, batch_size: int, max_grad_norm: float) -> float:
    """Largest deviation (relative to the gradient's norm) of the private methods' gradients as AdamW
    receives them, noise 0, first step, against DPSGDStep's."""
    methods = make_methods(work, batch_size, 0.0, max_grad_norm)
    methods.pop(BASELINE)
    received = {}
    for name, (fn, adamw) in methods.items():
        def capture(optimizer, args, kwargs, name=name):
            received[name] = [p.grad.clone() for p in optimizer.param_groups[0]["params"]]
        handle = adamw.register_step_pre_hook(capture)
        fn()
        handle.remove()
    reference = torch.cat([g.flatten() for g in received.pop(DP_STEP)])
    worst = max(float((torch.cat([g.flatten() for g in grads]) - reference).norm() / reference.norm())
                for grads in received.values())
    if worst > 1e-4:
        raise AssertionError(f"the private methods' gradients disagree (relative deviation {worst:.2e})")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _measure.common_arguments(parser, QUICK, FULL, _measure.REPO / "docs/benchmarks/train_speed.md")
    parser.add_argument("--targets", choices=["all", "selected"], default="all",
                        help="LoRA on all q/k/v matrices (DP-LoRA) or on a 30%% subset (DP-SAPF's size).")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--noise_multiplier", type=float, default=1.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    _measure.resolve_sizes(args, QUICK, FULL)
    if args.batch_size > args.num_examples:
        parser.error("--batch_size must be <= --num_examples")

    work = _measure.load_workload(args.num_examples)
    candidates = find_candidates(work.pipe.unet)
    targets = add_lora(work, args.targets, args.rank)
    deviation = check_agreement(work, args.batch_size, args.max_grad_norm)
    methods = {name: fn for name, (fn, _) in make_methods(work, args.batch_size, args.noise_multiplier,
                                                           args.max_grad_norm).items()}
    results = _measure.measure(methods, args.repeats)
    time_ratio, memory_ratio = _measure.ratios(results, DP_STEP, BASELINE)

    trainable = sum(p.numel() for p in work.pipe.unet.parameters() if p.requires_grad)
    facts = {"N": f"{args.num_examples} (sample rate q = batch / N)", "batch size": str(args.batch_size),
             "adapters": f"LoRA rank {args.rank} on {len(targets)} of {len(candidates)} q/k/v matrices "
                         f"({args.targets}), {trainable:,} trainable parameters",
             "timed repeats": f"{args.repeats} steps per method, interleaved, after one warm-up step each",
             "agreement": f"private methods' gradients within {deviation:.1e} (relative) of DPSGDStep's (noise 0)",
             "targets": f"time <= {TARGETS['time']}x, memory <= {TARGETS['memory']}x of the non-private step",
             "result": f"time {time_ratio:.2f}x, memory {memory_ratio:.2f}x"}
    notes = _measure.measurement_notes("one step (forward, backward, private gradient, AdamW step)") + [
        f"DP-SGD noise multiplier {args.noise_multiplier}, C = {args.max_grad_norm}; the batch is fixed "
        "(Poisson sampling costs nothing measurable and would make the batches differ).",
        "LoRA B starts at N(0, 0.01^2) instead of 0 (as after some training), so that every adapter "
        "gradient, A's included, is non-zero in the agreement check; the cost is the same."]
    _measure.write_report(args.output, "DP-SGD step: speed and memory",
                          "One DP-SGD step on LoRA adapters of the embedded model versus one non-private "
                          "LoRA step on the same batch.", facts, _measure.results_table(results, BASELINE), notes)
    print(_measure.results_table(results, BASELINE))
    print(f"time_ratio={time_ratio:.3f} memory_ratio={memory_ratio:.3f}")


if __name__ == "__main__":
    main()
