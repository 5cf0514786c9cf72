"""A labelled synthetic dataset from a text-to-image pipeline (public model, optionally + DP adapter).

Layout of an output folder, loadable with `datasets.load_dataset("imagefolder", data_dir=output_dir)`
(images sit under `train/` so that the card and the preview beside them do not break the
imagefolder's label inference):

    output_dir/train/<class folder>/<index:05d>.png   K images per class
    output_dir/class_prompts.json                     {"class_names": [...], "prompts": [...]}
    output_dir/synthesis_config.json                  generation settings (checked on resume)
    output_dir/preview_grid.png                       one row per class
    output_dir/README.md                              dataset card with the privacy statement
                                                      (``dataset_release.dataset_card``)
    output_dir/dataset/                               optional `Dataset.save_to_disk` copy
    output_dir/gen.npz                                optional DPImageBench copy (``dpimagebench``)

Image i of class c is generated from its own seed `image_seed(seed, c, i)`, in fixed per-class
batches, so an interrupted run resumed with the same settings writes the same files as an
uninterrupted one (a different `batch_size` only changes floating-point rounding).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .sampling import make_grid

IMAGES_SUBDIR = "train"
CLASS_PROMPTS_FILE = "class_prompts.json"
CONFIG_FILE = "synthesis_config.json"
PRIVACY_REPORT_FILE = "privacy_report.json"
PREVIEW_FILE = "preview_grid.png"
DATASET_SUBDIR = "dataset"
IMAGE_MODES = ("RGB", "L")


def read_class_prompts(path: str | Path) -> tuple[list[str], list[str]]:
    """(class_names, prompts) from a `class_prompts.json` file, or from the one inside a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CLASS_PROMPTS_FILE
    content = json.loads(path.read_text())
    class_names, prompts = list(content["class_names"]), list(content["prompts"])
    if len(class_names) != len(prompts):
        raise ValueError(f"{path}: {len(class_names)} class names but {len(prompts)} prompts")
    return class_names, prompts


def class_folder_name(class_name: str) -> str:
    """File-system safe folder name of a class ("T-shirt/top" -> "T-shirt_top")."""
    return re.sub(r"[^\w .-]", "_", class_name).strip(" .") or "_"


def class_folders(class_names: list[str]) -> list[str]:
    """Folder name of each class; raises if two classes would share a folder."""
    folders = [class_folder_name(name) for name in class_names]
    if len(set(folders)) != len(folders):
        raise ValueError(f"class names {class_names} map to clashing folder names {folders}")
    return folders


def image_seed(seed: int, class_index: int, index: int) -> int:
    """63-bit seed of image `index` of class `class_index`, independent of every other image."""
    high, low = np.random.SeedSequence((seed, class_index, index)).generate_state(2)
    return ((int(high) << 32) | int(low)) >> 1


def image_path(output_dir: str | Path, folder: str, index: int) -> Path:
    return Path(output_dir) / IMAGES_SUBDIR / folder / f"{index:05d}.png"


def _check_resume(output_dir: Path, config: dict) -> None:
    """Write the generation settings, or refuse to mix images made with different ones."""
    path = output_dir / CONFIG_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        ignored = {"images_per_class", "batch_size"}
        changed = sorted(key for key in config.keys() | previous.keys()
                         if key not in ignored and previous.get(key) != config.get(key))
        if changed:
            raise ValueError(f"{output_dir} holds images generated with other settings ({changed}); "
                             "use a new --output_dir")
    path.write_text(json.dumps(config, indent=2))


@torch.no_grad()
def synthesize(pipe, class_names: list[str], prompts: list[str], output_dir: str | Path,
               images_per_class: int, seed: int = 0, num_inference_steps: int = 25,
               guidance_scale: float = 4.0, batch_size: int = 64, show_progress: bool = True,
               metadata: dict | None = None, image_mode: str = "RGB") -> dict[str, list[Path]]:
    """Generate `images_per_class` PNGs per class prompt into `output_dir` (see module layout).

    Images that already exist are kept: a batch is generated only if one of its files is missing.
    Initial latents come from CPU generators, so CPU and GPU runs start from the same noise.
    `metadata` (e.g. model and adapter names) is stored with the settings in synthesis_config.json.
    `image_mode` is the PIL mode the PNGs are saved in ("RGB", or "L" for a grayscale dataset such as
    Fashion-MNIST: ITU-R 601 luma). It is a declared, public property of the data's format, like the
    resolution, never inferred from the sensitive images (that would be a data-dependent release).
    Returns the image paths of each class, in index order.
    """
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
    if len(class_names) != len(prompts):
        raise ValueError(f"{len(class_names)} class names but {len(prompts)} prompts")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folders = class_folders(class_names)
    _check_resume(output_dir, {**(metadata or {}), "class_names": class_names, "prompts": prompts,
                               "seed": seed, "num_inference_steps": num_inference_steps,
                               "guidance_scale": guidance_scale, "images_per_class": images_per_class,
                               "batch_size": batch_size, "scheduler": type(pipe.scheduler).__name__,
                               # RGB is not recorded, so folders made before image_mode existed still resume
                               **({} if image_mode == "RGB" else {"image_mode": image_mode})})
    (output_dir / CLASS_PROMPTS_FILE).write_text(
        json.dumps({"class_names": class_names, "prompts": prompts}, indent=2))

    paths = {name: [image_path(output_dir, folder, i) for i in range(images_per_class)]
             for name, folder in zip(class_names, folders)}
    batches = [(c, range(start, min(start + batch_size, images_per_class)))
               for c in range(len(class_names)) for start in range(0, images_per_class, batch_size)]
    missing = [(c, indices) for c, indices in batches
               if not all(paths[class_names[c]][i].exists() for i in indices)]
    done = len(class_names) * images_per_class - sum(len(indices) for _, indices in missing)
    with tqdm(total=len(class_names) * images_per_class, initial=done, unit="img",
              desc="synthesizing", disable=not show_progress) as bar:
        for c, indices in missing:
            generators = [torch.Generator("cpu").manual_seed(image_seed(seed, c, i)) for i in indices]
            images = pipe([prompts[c]] * len(indices), num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=generators, output_type="pil").images
            for i, image in zip(indices, images):
                path = paths[class_names[c]][i]
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    temporary = path.with_name(f".{path.name}.tmp")
                    image.convert(image_mode).save(temporary, format="PNG")
                    os.replace(temporary, path)
            bar.update(len(indices))
    return paths


def save_preview_grid(paths: dict[str, list[Path]], output_dir: str | Path, per_class: int = 8) -> Path:
    """`preview_grid.png`: one row per class with its first `per_class` images (small ones enlarged)."""
    rows = [[Image.open(path).convert("RGB") for path in class_paths[:per_class]]
            for class_paths in paths.values()]
    columns = max(len(row) for row in rows)
    blank = Image.new("RGB", rows[0][0].size, "white")
    images = [row[i] if i < len(row) else blank for row in rows for i in range(columns)]
    grid = make_grid(images, columns=columns, scale=max(1, 64 // images[0].width))
    grid.save(Path(output_dir) / PREVIEW_FILE)
    return Path(output_dir) / PREVIEW_FILE


def to_dataset(paths: dict[str, list[Path]]):
    """A `datasets.Dataset` with columns image and label (ClassLabel of the class names).

    Images reference the PNG files; `save_to_disk` embeds their bytes.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    class_names = list(paths)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=class_names)})
    return Dataset.from_dict({"image": [str(path) for name in class_names for path in paths[name]],
                              "label": [label for label, name in enumerate(class_names)
                                        for _ in paths[name]]}, features=features)


def read_privacy_report(lora_dir: str | Path | None):
    """The adapter folder's privacy_report.json as an `accounting.PrivacyReport`, or None."""
    if lora_dir is None or not (Path(lora_dir) / PRIVACY_REPORT_FILE).exists():
        return None
    from .accounting import PrivacyReport

    return PrivacyReport.load(str(Path(lora_dir) / PRIVACY_REPORT_FILE))


def privacy_statement(lora_dir: str | Path | None, report) -> str:
    """Markdown paragraph on what the synthetic images may reveal about the sensitive data.

    `report` is the adapter's `PrivacyReport` (None if it has none).
    """
    if lora_dir is None:
        return ("No adapter was used: the images come from the public model and the class prompts alone "
                "(class names are treated as public), so they reveal nothing about any sensitive images "
                "(epsilon = 0).")
    if report is None:
        return (f"The adapter `{lora_dir}` has no `{PRIVACY_REPORT_FILE}`: no privacy guarantee can be "
                "stated for these images. Do not share them unless the adapter's training was private.")
    if not report.private:
        return (f"The adapter was trained WITHOUT a differential-privacy guarantee (epsilon = "
                f"{report.epsilon}, noise: {report.noise_source}): these images may reveal sensitive "
                "training data.")
    bounds = ", ".join(f"epsilon = {value:.4g} ({name.upper()} accountant)"
                       for name, value in report.epsilon.items())
    return ("Only differentially private outputs were used to make these images: the public model, the "
            "DP-trained LoRA adapter, the class prompts and a public seed. By the post-processing property "
            f"of differential privacy the whole synthetic set satisfies ({bounds}, "
            f"delta = {report.delta:.3g})-DP for the sensitive training set (adjacency: "
            f"{report.adjacency_definition}), "
            "the same guarantee as the adapter, and can be shared under it.")
