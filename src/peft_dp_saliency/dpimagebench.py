"""DPImageBench's synthetic-set file, ``gen.npz``, written from and read into this package's formats.

The layout, as DPImageBench writes and reads it (github.com/2019ChenGong/DPImageBench: every
``models/*.py`` ends with ``np.savez(os.path.join(config.log_dir, "gen.npz"), x=syn_data, y=syn_labels)``;
``eval.py`` loads ``syn["x"], syn["y"]`` into ``evaluation/evaluator.py``):

    x  float32 (N, C, R, R), NCHW, values in [0, 1] (decoded images clamped to [0, 1]; the evaluator
       trains its classifiers on ``torch.from_numpy(x).float()`` and compares with real test images
       that its loader scales by 1/255, so uint8 0..255 would be off by 255x)
    y  int64 (N,), the dataset's own label indices (class c of ``class_prompts.json`` is label c)

C is the dataset's ``num_channels`` (1 for MNIST / Fashion-MNIST, 3 for CIFAR-10 ...) and R its
``resolution`` (28 for MNIST / Fashion-MNIST, 32 for CIFAR-10). The evaluator nearest-resizes other
sizes and turns 3 channels into 1 itself; writing the benchmark's own C and R avoids both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data import resize_center_crop, to_rgb

GEN_NPZ = "gen.npz"
FITS = ("resize", "center_crop")


def fit_image(image: Image.Image, resolution: int | None, fit: str = "resize") -> Image.Image:
    """The image at R x R: "resize" (shorter side bilinear + center crop, as data.py prepares training
    images) or "center_crop" (the inverse of zero padding: a 32 x 32 image made from a 28 x 28
    Fashion-MNIST one by ``data.py``'s 2-pixel pad gives back its 28 x 28 centre). None: unchanged."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if resolution is None or image.size == (resolution, resolution):
        return image
    if fit == "resize":
        return resize_center_crop(image, resolution)
    width, height = image.size
    if resolution > min(width, height):
        raise ValueError(f"cannot center-crop a {width}x{height} image to {resolution}x{resolution}")
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def gen_arrays(paths: dict[str, list[Path]], resolution: int | None = None, channels: int = 3,
               fit: str = "resize") -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (N, C, R, R) in [0, 1], y int64 (N,)) of a synthetic set, classes in `paths` order.

    paths: class name -> image files (``synthesis.synthesize``'s return); label c is the c-th class.
    channels: 3 (RGB) or 1 (PIL "L": ITU-R 601 luma). resolution: R (None: the images' own size).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files = [(label, path) for label, class_paths in enumerate(paths.values()) for path in class_paths]
    if not files:
        raise ValueError("no images to write")
    x, y = None, np.empty(len(files), dtype=np.int64)
    for row, (label, path) in enumerate(files):
        with Image.open(path) as image:
            pixels = np.asarray(fit_image(to_rgb(image), resolution, fit).convert("RGB" if channels == 3 else "L"))
        pixels = pixels.reshape(*pixels.shape[:2], channels).transpose(2, 0, 1)  # CHW
        if x is None:
            x = np.empty((len(files), *pixels.shape), dtype=np.float32)
        if pixels.shape != x.shape[1:]:
            raise ValueError(f"{path}: size {pixels.shape[1:]} differs from the first image's {x.shape[2:]}; "
                             "pass a resolution")
        x[row] = pixels / np.float32(255)
        y[row] = label
    return x, y


def write_gen_npz(paths: dict[str, list[Path]], output_path: str | Path, resolution: int | None = None,
                  channels: int = 3, fit: str = "resize") -> Path:
    """Write DPImageBench's gen.npz (``gen_arrays``) to output_path (a file, or a folder: <folder>/gen.npz)."""
    output_path = Path(output_path)
    if output_path.suffix != ".npz":
        output_path = output_path / GEN_NPZ
    x, y = gen_arrays(paths, resolution, channels, fit)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_name(f".{output_path.stem}.tmp.npz")
    np.savez(temporary, x=x, y=y)
    temporary.replace(output_path)
    return output_path


def read_gen_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, R, R, C) HWC, labels int64 (N,)) of a gen.npz.

    Accepts DPImageBench's float [0, 1] NCHW and, leniently, uint8 0..255 or NHWC (C in {1, 3});
    anything else raises ValueError naming what is wrong.
    """
    with np.load(path) as archive:
        if not {"x", "y"} <= set(archive.files):
            raise ValueError(f"{path}: a gen.npz holds arrays 'x' and 'y', found {archive.files}")
        x, y = archive["x"], archive["y"]
    if x.ndim != 4 or len(x) != len(y) or y.ndim != 1:
        raise ValueError(f"{path}: x must be (N, C, R, R) and y (N,), got {x.shape} and {y.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    elif x.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: x has {x.shape[1]} (NCHW) or {x.shape[-1]} (NHWC) channels, not 1 or 3")
    if x.dtype != np.uint8:
        if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"{path}: float x must lie in [0, 1] (DPImageBench's range), got "
                             f"[{x.min()}, {x.max()}]")
        x = np.rint(x * 255).astype(np.uint8)
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"{path}: y must hold non-negative integer labels, got {y.dtype}")
    return x, y.astype(np.int64)


def gen_npz_images(path: str | Path, resolution: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """(RGB PIL images at R x R, labels) of a gen.npz: grey replicated to RGB and sizes brought to R as
    ``data.py`` brings training and test images (so both sides of an evaluation match)."""
    x, y = read_gen_npz(path)
    mode = "L" if x.shape[-1] == 1 else "RGB"
    images = [fit_image(Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).convert("RGB"),
                        resolution) for pixels in x]
    return images, y
