"""Generate a labelled synthetic dataset with the public model and (optionally) a DP LoRA adapter.

    python examples/synthesize.py --lora_dir runs/dp_sapf --output_dir runs/dp_sapf_synthetic

Without --lora_dir the untouched public model is sampled (the "public model" baseline; pass the
classes with --class_names and --prompts). Class names and prompts come from the adapter folder's
class_prompts.json when present, the base model from the adapter's own metadata (adapter_config.json
or its model card) unless --pretrained_model_name_or_path is given. Run the same command again to
resume an interrupted run. The output folder is an `imagefolder` (see `peft_dp_saliency.synthesis`)
with a dataset card that states the adapter's privacy guarantee; --output_format npz adds
DPImageBench's gen.npz (`peft_dp_saliency.dpimagebench`); --push_to_hub publishes it as a Hub dataset.

    python examples/synthesize.py --lora_dir runs/dp_sapf --output_dir runs/dp_sapf_synthetic \
        --output_format both --npz_resolution 28 --npz_fit center_crop --npz_channels 1  # DPImageBench FMNIST
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from peft_dp_saliency import dataset_release, dpimagebench, hub, load_adapter, synthesis
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH, load_public_pipeline
from peft_dp_saliency.sampling import use_dpm_solver

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Base pipeline (Hub name or folder); default: the one the adapter's metadata names, "
                        "the embedded public model without --lora_dir.")
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
    p.add_argument("--guidance_scale", type=float, default=4.0,
                   help="Classifier-free guidance scale (1 = none, half the compute). On the embedded default 1 drew "
                        "better training data than 4 for every adapter compared (docs/results.md, validation split: "
                        "guidance extrapolates from an unconditional prediction the adapter never trained unless "
                        "--proportion_empty_prompts was given); scripts/run.sh uses 1.")
    p.add_argument("--image_mode", choices=synthesis.IMAGE_MODES, default="RGB",
                   help="Mode of the saved images: RGB, or L (grayscale) when the private data is grayscale, "
                        "e.g. Fashion-MNIST. A declared format, like the resolution; never read from the data.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_dataset", action="store_true",
                   help=f"Also save a `datasets` copy (image, label) to "
                        f"output_dir/{synthesis.DATASET_SUBDIR}.")
    p.add_argument("--preview_per_class", type=int, default=8)
    p.add_argument("--output_format", choices=["imagefolder", "npz", "both"], default="imagefolder",
                   help="imagefolder (PNGs under train/); npz: DPImageBench's gen.npz only (the PNGs are removed "
                        "once it is written); both.")
    p.add_argument("--npz_resolution", type=int, default=None,
                   help="R of gen.npz (DPImageBench: 28 for (Fashion-)MNIST, 32 for CIFAR); default: as generated.")
    p.add_argument("--npz_channels", type=int, choices=[1, 3], default=3,
                   help="C of gen.npz: 1 for grey datasets (DPImageBench's MNIST / Fashion-MNIST), 3 for colour.")
    p.add_argument("--npz_fit", choices=list(dpimagebench.FITS), default="resize",
                   help="How images reach --npz_resolution: resize, or center_crop (undoes the 2-pixel padding "
                        "of Fashion-MNIST to 32x32: --npz_resolution 28 --npz_fit center_crop).")
    p.add_argument("--push_to_hub", action="store_true",
                   help="Push the set as a Hub dataset (image, label) with a card quoting the adapter's guarantee.")
    p.add_argument("--hub_model_id", default=None, help="The dataset repository, e.g. you/dp-fmnist-synthetic.")
    p.add_argument("--hub_token", default=None)
    p.add_argument("--hub_private", action="store_true", help="Create the Hub dataset as private.")
    p.add_argument("--adapter_repo_id", default=None, help="Hub id of the adapter, linked from the dataset card.")
    p.add_argument("--license", default=None, help="Dataset license; default: the adapter card's, else other.")
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


def base_model(args) -> str:
    """--pretrained_model_name_or_path, else the base the adapter's metadata names (exits with the fix if
    it names none or one that is not here), else (no adapter) the embedded public model."""
    if args.pretrained_model_name_or_path is not None:
        return args.pretrained_model_name_or_path
    if args.lora_dir is None:
        return str(EMBEDDED_MODEL_PATH)
    try:
        return hub.release_base_model(args.lora_dir)
    except ValueError as error:
        raise SystemExit(str(error)) from error


def check_push(args, report) -> None:
    """Before anything is generated: a repo name, a private adapter, and a token that can create the repo."""
    if not args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id")
    if args.lora_dir is not None and (report is None or not report.private):
        raise SystemExit(f"--push_to_hub: the adapter {args.lora_dir} states no DP guarantee "
                         "(privacy_report.json missing or not private); its images may reveal the training data")
    try:
        dataset_release.prepare_dataset_repo(args.hub_model_id, token=args.hub_token, private=args.hub_private)
    except Exception as error:  # auth, name, network: fail before generating anything
        raise SystemExit(f"--push_to_hub: cannot create or access the dataset {args.hub_model_id}: {error}") from error


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    class_names, prompts = class_prompts(args)
    args.pretrained_model_name_or_path = base_model(args)
    report = synthesis.read_privacy_report(args.lora_dir)
    if args.push_to_hub:
        check_push(args, report)

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
                                 metadata=model, image_mode=args.image_mode)
    synthesis.save_preview_grid(paths, args.output_dir, per_class=args.preview_per_class)
    if args.save_dataset:
        synthesis.to_dataset(paths).save_to_disk(str(args.output_dir / synthesis.DATASET_SUBDIR))

    statement = synthesis.privacy_statement(args.lora_dir, report)
    settings = {"pretrained_model_name_or_path": hub.hub_model_id(args.pretrained_model_name_or_path)
                or hub.LOCAL_BASE.format(hub.local_base_name(args.pretrained_model_name_or_path)),
                "images_per_class": args.images_per_class, "scheduler": type(pipe.scheduler).__name__,
                "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "seed": args.seed, "image_mode": args.image_mode}
    card = dataset_release.dataset_card(
        statement, report, settings, sum(map(len, paths.values())), class_names,
        adapter=args.adapter_repo_id or (None if args.lora_dir is None else str(args.lora_dir)),
        license=args.license or dataset_release.adapter_license(args.lora_dir))
    card.save(str(args.output_dir / "README.md"))
    if args.push_to_hub:
        dataset_release.push_synthetic_dataset(paths, card, args.hub_model_id, token=args.hub_token,
                                               private=args.hub_private)
        logger.info("pushed to https://huggingface.co/datasets/%s", args.hub_model_id)
    if args.output_format in ("npz", "both"):
        npz = dpimagebench.write_gen_npz(paths, args.output_dir, args.npz_resolution, args.npz_channels,
                                         args.npz_fit)
        logger.info("wrote %s", npz)
    if args.output_format == "npz":
        shutil.rmtree(args.output_dir / synthesis.IMAGES_SUBDIR)
    logger.info("wrote %d images to %s", sum(map(len, paths.values())), args.output_dir)


if __name__ == "__main__":
    main()
