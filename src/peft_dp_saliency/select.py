"""Run the private saliency query alone and write the selection as JSON.

    python -m peft_dp_saliency.select --output_json selection.json [--dataset_name ... | --train_data_dir ...]

The JSON holds the selected matrices, the noisy scores (DP outputs), the mechanism's parameters
and its (epsilon, delta) from the accountant; the per-block table is printed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from . import accounting
from .candidates import UNITS
from .config import SaliencyLoraConfig
from .public_model import EMBEDDED_MODEL_PATH


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The SaliencyLoraConfig selection flags (shared by this CLI and examples/train_dp_sapf.py)."""
    g = parser.add_argument_group("saliency selection (SaliencyLoraConfig fields)")
    g.add_argument("--selection_strategy", default="saliency", choices=["saliency", "random", "all"])
    g.add_argument("--candidate_pool", default="attn_qkv", choices=["attn_qkv", "attn_qkvo", "all_linear"])
    g.add_argument("--selection_unit", default="matrix", choices=list(UNITS),
                   help=SaliencyLoraConfig.__dataclass_fields__["selection_unit"].metadata["help"])
    g.add_argument("--selection_ratio", type=float, default=0.3)
    g.add_argument("--saliency_score", default="norm", choices=["norm", "debiased"])
    g.add_argument("--selection_noise_multiplier", type=float, default=None,
                   help="sigma_s: the query's noise std is sigma_s C / N. Default: calibrated from "
                        "--selection_budget_fraction.")
    g.add_argument("--selection_budget_fraction", type=float, default=0.1,
                   help="Without --selection_noise_multiplier: sigma_s is the smallest noise whose query alone "
                        "costs at most this fraction of --target_epsilon (under both accountants).")
    g.add_argument("--selection_max_grad_norm", type=float, default=1.0)
    g.add_argument("--selection_sample_rate", type=float, default=0.1,
                   help="The query runs on a Poisson subsample of this rate (amplification accounted; 1 = all N).")
    g.add_argument("--selection_clipping", default="automatic", choices=["automatic", "flat"])
    g.add_argument("--selection_noise_multiplicity", type=int, default=1)
    g.add_argument("--selection_batch_size", type=int, default=64)


def config_from_args(args, seed: int | None, selection_noise_multiplier: float, **lora_fields) -> SaliencyLoraConfig:
    """A SaliencyLoraConfig from the selection flags (plus any LoRA fields).

    `seed` (the public --seed) is kept only where it is used: the data-independent random strategy,
    or --deterministic_noise (tests); the saliency query's randomness is otherwise secret.
    """
    deterministic = getattr(args, "deterministic_noise", False)
    data_seed = seed if args.selection_strategy == "random" or deterministic else None
    return SaliencyLoraConfig(
        candidate_pool=args.candidate_pool, selection_unit=args.selection_unit,
        selection_ratio=args.selection_ratio, selection_strategy=args.selection_strategy,
        saliency_score=args.saliency_score, selection_noise_multiplier=selection_noise_multiplier,
        selection_max_grad_norm=args.selection_max_grad_norm, selection_clipping=args.selection_clipping,
        selection_noise_multiplicity=args.selection_noise_multiplicity,
        selection_sample_rate=args.selection_sample_rate, selection_seed=data_seed,
        deterministic_noise=deterministic, **lora_fields)


def main(argv=None) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from .data import load_sensitive_dataset
    from .diffusion import encode_dataset
    from .selection import select_target_modules

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=str(EMBEDDED_MODEL_PATH))
    p.add_argument("--dataset_name", default=None)
    p.add_argument("--train_data_dir", default=None)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--target_delta", type=float, default=None, help="Default: 1/(N ln N).")
    p.add_argument("--target_epsilon", type=float, default=10.0,
                   help="The run's budget: with --selection_budget_fraction f the query costs at most f of it.")
    p.add_argument("--seed", type=int, default=None,
                   help="Seeds the random strategy only; never the query's randomness (unless --deterministic_noise).")
    p.add_argument("--class_names", nargs="+", default=None,
                   help="The public class list (required when the label column is not a datasets.ClassLabel).")
    p.add_argument("--adjacency", default=accounting.DEFAULT_ADJACENCY, choices=sorted(accounting.ADJACENCIES))
    p.add_argument("--deterministic_noise", action="store_true", help="Tests only: NOT private.")
    p.add_argument("--output_json", type=Path, required=True)
    add_selection_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.unet.requires_grad_(False)
    resolution = args.resolution or int(pipe.vae.config.sample_size)
    dataset = load_sensitive_dataset(args.train_data_dir or args.dataset_name, resolution=resolution,
                                     class_names=args.class_names, max_examples=args.max_train_samples)
    delta = args.target_delta if args.target_delta is not None else accounting.default_delta(len(dataset))
    accounting.check_delta(delta, len(dataset))
    data = encode_dataset(pipe, dataset, batch_size=args.selection_batch_size)
    sigma_s = args.selection_noise_multiplier or accounting.selection_noise_for_budget(
        args.selection_budget_fraction * args.target_epsilon, delta, args.adjacency, len(dataset),
        args.selection_sample_rate)
    config = config_from_args(args, args.seed, sigma_s)
    scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    result = select_target_modules(pipe.unet, scheduler, data, config, args.selection_batch_size)
    out = result.to_dict()
    if result.mechanism is not None:
        stages = [accounting.selection_stage(config.selection_noise_multiplier, config.selection_max_grad_norm,
                                             config.selection_sample_rate)]
        out["privacy"] = {"delta": delta, "dataset_size": len(dataset), "adjacency": args.adjacency,
                          "epsilon": {a: accounting.compute_epsilon(stages, delta, a, adjacency=args.adjacency)
                                      for a in accounting.ACCOUNTANTS},
                          "noise": "deterministic (NOT PRIVATE)" if args.deterministic_noise else "os.urandom-seeded"}
    accounting.write_json_atomic(str(args.output_json), out)
    print(result.table())
    return out


if __name__ == "__main__":
    main()
