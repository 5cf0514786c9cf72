"""Run the private saliency query alone and write the selection as JSON.

    python -m peft_dp_saliency.select --output_json selection.json [--dataset_name ... | --train_data_dir ...]

The JSON holds the selected matrices, the noisy scores (DP outputs), the mechanism's parameters
and its (epsilon, delta) from the accountant; the per-block table is printed.
"""

from __future__ import annotations

import logging
from dataclasses import field

import torch

from . import accounting
from .config import SaliencyLoraConfig
from .training_config import SELECTION_FLAGS, arguments_subset, parse_args


# The run flags this command needs and the selection flags: TrainingConfig's own fields (one definition).
SelectArguments = arguments_subset(
    "SelectArguments",
    ["pretrained_model_name_or_path", "dataset_name", "train_data_dir", "max_train_samples", "resolution",
     "target_delta", "target_epsilon", "seed", "class_names", "adjacency", "deterministic_noise",
     "max_sequence_length", *SELECTION_FLAGS],
    extra=(("output_json", str, field(metadata={"help": "Where the selection (JSON) is written."})),))


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
    from .data import load_sensitive_dataset
    from .families import detect_family
    from .selection import select_target_modules

    args = parse_args(argv, SelectArguments, description=__doc__)
    logging.basicConfig(level=logging.INFO)

    family = detect_family(args.pretrained_model_name_or_path)  # SD, SDXL, SD3, Flux, Sana; else a clear error
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = family.load_pipeline(args.pretrained_model_name_or_path).to(device)
    for module in family.frozen_modules(pipe):
        module.requires_grad_(False)
    resolution = args.resolution or family.default_resolution(args.pretrained_model_name_or_path)
    family.check_resolution(resolution)
    dataset = load_sensitive_dataset(args.train_data_dir or args.dataset_name, resolution=resolution,
                                     class_names=args.class_names, max_examples=args.max_train_samples)
    delta = args.target_delta if args.target_delta is not None else accounting.default_delta(len(dataset))
    accounting.check_delta(delta, len(dataset))
    sequence = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    data = family.encode_dataset(pipe, dataset, batch_size=args.selection_batch_size, resolution=resolution,
                                 **sequence)
    sigma_s = args.selection_noise_multiplier or accounting.selection_noise_for_budget(
        args.selection_budget_fraction * args.target_epsilon, delta, args.adjacency, len(dataset),
        args.selection_sample_rate)
    config = config_from_args(args, args.seed, sigma_s)
    scheduler = family.noise_scheduler(args.pretrained_model_name_or_path)
    result = select_target_modules(family.denoiser(pipe), scheduler, data, config, args.selection_batch_size,
                                   family=family)
    out = result.to_dict()
    if result.mechanism is not None:
        stages = [accounting.selection_stage(config.selection_noise_multiplier, config.selection_max_grad_norm,
                                             config.selection_sample_rate)]
        accountants = [a for a in accounting.ACCOUNTANTS if accounting.supports(a, stages, args.adjacency)]
        out["privacy"] = {"delta": delta, "dataset_size": len(dataset), "adjacency": args.adjacency,
                          "epsilon": {a: accounting.compute_epsilon(stages, delta, a, adjacency=args.adjacency)
                                      for a in accountants},
                          "noise": "deterministic (NOT PRIVATE)" if args.deterministic_noise else "os.urandom-seeded"}
    accounting.write_json_atomic(args.output_json, out)
    print(result.table())
    return out


if __name__ == "__main__":
    main()
