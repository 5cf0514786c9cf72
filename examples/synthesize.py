#!/usr/bin/env python
"""Generate a labelled synthetic dataset with the public model and (optionally) a DP LoRA adapter.

    python examples/synthesize.py --lora_dir runs/dp_sapf --output_dir runs/dp_sapf_synthetic

Without --lora_dir the untouched public model is sampled (the "public model" baseline; pass the
classes with --class_names and --prompts). Class names and prompts come from the adapter folder's
class_prompts.json when present. Run the same command again to resume an interrupted run.
The output folder is an `imagefolder` (see `peft_dp_saliency.synthesis`) with a dataset card that
states the adapter's privacy guarantee.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from peft_dp_saliency import load_adapter, synthesis
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH, load_public_pipeline
from peft_dp_saliency.sampling import use_dpm_solver

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=str(EMBEDDED_MODEL_PATH),
                   help="Base pipeline (Hub name or folder); default: the embedded public model.")
    p.add_argument("--lora_dir", type=Path, default=None,
                   help="Folder with pytorch_lora_weights.safetensors; omit for the public-model baseline.")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--class_names", nargs="+", default=None,
                   help="Class names, when the adapter folder has no class_prompts.json.")
    p.add_argument("--prompts", nargs="+", default=None, help="One prompt per class, same order.")
    p.add_argument("--images_per_class", type=int, default=6000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--scheduler", choices=["dpm_solver_multistep", "pipeline"],
                   default="dpm_solver_multistep",
                   help="DPM-Solver multistep, or the scheduler stored with the pipeline.")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_dataset", action="store_true",
                   help=f"Also save a `datasets` copy (image, label) to "
                        f"output_dir/{synthesis.DATASET_SUBDIR}.")
    p.add_argument("--preview_per_class", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torch_dtype", choices=sorted(DTYPES), default="float32")
    return p.parse_args(argv)


def class_prompts(args) -> tuple[list[str], list[str]]:
    """(class_names, prompts) from the adapter folder's class_prompts.json, else from the flags."""
    if args.lora_dir is not None and (args.lora_dir / synthesis.CLASS_PROMPTS_FILE).exists():
        return synthesis.read_class_prompts(args.lora_dir)
    if not args.class_names or not args.prompts or len(args.class_names) != len(args.prompts):
        raise SystemExit("give --class_names and as many --prompts (or a --lora_dir with class_prompts.json)")
    return args.class_names, args.prompts


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    class_names, prompts = class_prompts(args)

    pipe = load_public_pipeline(args.pretrained_model_name_or_path, torch_dtype=DTYPES[args.torch_dtype])
    if args.lora_dir is not None and (args.lora_dir / "loda_config.json").exists():
        load_adapter(pipe, args.lora_dir)  # a LoDA release (--adapter loda / loda_plus)
    elif args.lora_dir is not None:
        pipe.load_lora_weights(str(args.lora_dir))
    if args.scheduler == "dpm_solver_multistep":
        use_dpm_solver(pipe)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    model = {"pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
             "lora_dir": None if args.lora_dir is None else str(args.lora_dir)}
    paths = synthesis.synthesize(pipe, class_names, prompts, args.output_dir, args.images_per_class,
                                 seed=args.seed, num_inference_steps=args.num_inference_steps,
                                 guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                 metadata=model)
    synthesis.save_preview_grid(paths, args.output_dir, per_class=args.preview_per_class)
    if args.save_dataset:
        synthesis.to_dataset(paths).save_to_disk(str(args.output_dir / synthesis.DATASET_SUBDIR))

    statement = synthesis.privacy_statement(args.lora_dir, synthesis.read_privacy_report(args.lora_dir))
    config = {**model, "images_per_class": args.images_per_class, "classes": len(class_names),
              "scheduler": type(pipe.scheduler).__name__, "num_inference_steps": args.num_inference_steps,
              "guidance_scale": args.guidance_scale, "seed": args.seed}
    synthesis.write_dataset_card(args.output_dir, config, statement)
    logger.info("wrote %d images to %s", sum(map(len, paths.values())), args.output_dir)


if __name__ == "__main__":
    main()
