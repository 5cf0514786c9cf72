"""Labelled image sets as compact uint8 tensors: the real test split and a synthetic set.

Both are read with `peft_dp_saliency.data.load_sensitive_dataset`, so they follow its documented
rules: every image is converted to RGB and resized (shorter side) + center-cropped to R x R,
unsupported or unreadable files and empty class folders raise ValueError naming them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import load_sensitive_dataset
from ..dpimagebench import gen_npz_images
from ..synthesis import CLASS_PROMPTS_FILE, IMAGES_SUBDIR, class_folder_name


@dataclass
class LabelledImages:
    """images: (N, 3, R, R) uint8 RGB; labels: (N,) int64 in [0, K); class_names: K names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def from_dataset(dataset, batch_size: int = 512) -> LabelledImages:
    """Decode a `SensitiveImageDataset` ((3, R, R) items in [-1, 1]) into uint8 tensors."""
    images, labels = [], []
    for batch, batch_labels in DataLoader(dataset, batch_size=batch_size):
        images.append(((batch + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(batch_labels.long())
    return LabelledImages(torch.cat(images), torch.cat(labels), list(dataset.class_names))


def load_real(source: str | None, split: str = "test", resolution: int = 32) -> LabelledImages:
    """The real images of `split` ("fashion-mnist", a folder or a Hub name, as for training)."""
    return from_dataset(load_sensitive_dataset(source, split=split, resolution=resolution))


def load_synthetic(path: str | Path, resolution: int = 32, class_names: list[str] | None = None) -> LabelledImages:
    """A synthetic set: an `examples/synthesize.py` output folder, an imagefolder, a saved dataset or a
    DPImageBench gen.npz.

    In a synthesis output folder, class folders are mapped back to the class names of its
    class_prompts.json (folder names are file-system safe versions of them). A gen.npz stores label
    indices only: class_names names labels 0..K-1 (DPImageBench's labels are the dataset's own, so
    pass the real set's class names).
    """
    path = Path(path)
    if path.suffix == ".npz":
        if class_names is None:
            raise ValueError(f"{path}: a gen.npz holds no class names; pass the names of its labels 0..K-1")
        return _from_gen_npz(path, resolution, list(class_names))
    synthesis_output = (path / CLASS_PROMPTS_FILE).is_file() and (path / IMAGES_SUBDIR).is_dir()
    dataset = load_sensitive_dataset(str(path / IMAGES_SUBDIR if synthesis_output else path),
                                     split="train", resolution=resolution)
    images = from_dataset(dataset)
    if synthesis_output:
        names = json.loads((path / CLASS_PROMPTS_FILE).read_text())["class_names"]
        by_folder = {class_folder_name(name): name for name in names}
        images.class_names = [by_folder.get(folder, folder) for folder in images.class_names]
    return images


def _from_gen_npz(path: Path, resolution: int, class_names: list[str]) -> LabelledImages:
    images, labels = gen_npz_images(path, resolution)
    if len(labels) and labels.max() >= len(class_names):
        raise ValueError(f"{path}: label {labels.max()} has no name among the {len(class_names)} classes")
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    return LabelledImages(pixels.contiguous(), torch.from_numpy(labels), class_names)


def align_classes(synthetic: LabelledImages, real: LabelledImages) -> LabelledImages:
    """The synthetic set relabelled to the real set's class indices (matched by class name).

    Raises ValueError if the two sets do not have the same classes.
    """
    missing = sorted(set(real.class_names) - set(synthetic.class_names))
    extra = sorted(set(synthetic.class_names) - set(real.class_names))
    if missing or extra or len(set(synthetic.class_names)) != len(synthetic.class_names):
        raise ValueError(f"the synthetic classes {synthetic.class_names} differ from the real classes "
                         f"{real.class_names} (missing: {missing}, unknown: {extra})")
    to_real = torch.tensor([real.class_names.index(name) for name in synthetic.class_names])
    return LabelledImages(synthetic.images, to_real[synthetic.labels], list(real.class_names))
