"""The sensitive labelled images: Fashion-MNIST files, a `datasets` dataset, or an imagefolder.

`load_sensitive_dataset` builds a `SensitiveImageDataset` whose items are
``(image, label)``: image a float32 tensor of shape (3, R, R) with values in [-1, 1]
(``x / 127.5 - 1`` of the 8-bit RGB values), label an int in [0, K). It also holds
``class_names`` (K), ``prompts`` (K, index = label), ``labels`` (N,) int64 and a
``description`` for reports and model cards.

Sources (``source`` argument):

=================================  ======================================================
``None`` or ``"fashion-mnist"``    Debian package dataset-fashion-mnist, files under
                                   /usr/share/datasets/fashion-mnist; split "train" (60000)
                                   or "test" (t10k, 10000); DPImageBench class names.
existing folder with               a `datasets` dataset saved with ``save_to_disk``
``state.json`` +                   (a ``dataset_dict.json`` folder is a DatasetDict: the
``dataset_info.json``              ``split`` is picked from it).
other existing folder              imagefolder ``root/<class_name>/<image files>``; class
                                   order = sorted subfolder names, file order = sorted names;
                                   an empty class folder is a class with zero examples.
anything else                      a Hugging Face Hub dataset name, loaded with
                                   ``datasets.load_dataset(source, split=split)``.
=================================  ======================================================

Image conversions, in this order (the same for every file / row):

==========================  ================================================================
Fashion-MNIST (28x28 L)     zero-padded by 2 px per side to 32x32 (black border, -1 after
                            scaling), replicated to 3 channels; then resized as below.
EXIF orientation            applied (``ImageOps.exif_transpose``); first frame of animations.
"RGB"                       unchanged.
"1", "L", "P", "RGBX",      ``Image.convert("RGB")`` (gray values replicated to 3 channels).
"CMYK", "YCbCr"
"RGBA", "LA", "PA",         composited over black: rgb * alpha / 255.
"P" with transparency
"I;16", "I;16B", "I;16L",   16-bit gray scaled to 8 bits by a fixed /257 (0 -> 0,
"I;16N", "I" (0..65535)     65535 -> 255; not by the image's own max), then as "L".
                            "I" values outside 0..65535 are an error.
other modes ("F", ...)      error at construction naming the file.
size != R x R               shorter side resized to R (PIL bilinear, antialiased when
                            shrinking), then center-cropped to R x R, as in diffusers'
                            train_text_to_image_lora.py (Resize, CenterCrop).
values                      uint8 -> float32 ``x / 127.5 - 1`` (Normalize([0.5], [0.5])).
==========================  ================================================================

Nothing is dropped silently, since N enters the privacy analysis: every image is opened,
decoded and converted at construction, before any privacy budget is spent, and any failure
(unreadable, truncated, non-image or unsupported files; a missing column; labels out of
range; an empty class folder or root) raises ValueError naming the files or column and the
fix. The only entries skipped are hidden ones (names starting with "."), e.g. .DS_Store.
Any other file in an imagefolder must be an image (the extension is not looked at), and the
root may contain only class folders. ``max_examples=K`` keeps the first K items in the order
above (N is then min(K, available)); only those are verified.

Memory: Fashion-MNIST stays a (N, 28, 28) uint8 tensor and is converted per item; files and
`datasets` rows are decoded per item. No size is assumed (32x32 and 512x512 work alike).

Class names are public input, never read off the sensitive examples (one added or removed
example must not change them, and they are released in prompts, cards and sample grids): a
``datasets.ClassLabel`` feature's names, an imagefolder's folder names (the schema its owner chose),
the DPImageBench names of Fashion-MNIST, or an explicit ``class_names`` list. A label column that is
not a ClassLabel needs ``class_names`` (its values are matched to them as strings); without it the
loader raises before anything is spent. ``class_names_source`` says which of these it was.

Prompts: ``prompt_template.format(class_name)`` with the class name as spelled in the source
(DPImageBench style, "An image of a T-shirt"); CLIP tokenizers lower-case text anyway.
An explicit ``prompts`` list (one per class) overrides the template.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_SPLITS = {"train": "train", "validation": "train", "test": "t10k"}
# "validation": the last 10,000 training images, for choosing hyperparameters without reading the test split;
# a run tuned on it must train on the first 50,000 at most (--max_train_samples 50000) to keep it held out.
FASHION_MNIST_VALIDATION = slice(50_000, 60_000)
DEFAULT_PROMPT_TEMPLATE = "An image of a {}"
MAX_LISTED_PROBLEMS = 20

_AS_RGB_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"}
_ALPHA_MODES = {"RGBA", "LA", "PA"}
_16_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# --image_interpolation_mode names (torchvision's InterpolationMode) -> the PIL filter that does it
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "nearest_exact": Image.Resampling.NEAREST,
              "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
_CONVERSIONS = ("converted to RGB (gray replicated, alpha composited over black, 16-bit "
                "scaled /257), shorter side resized to {r} ({mode}) and center-cropped "
                "to {r}x{r}")


class SensitiveImageDataset(Dataset):
    """(image, label) items: image float32 (3, R, R) in [-1, 1], label int in [0, K).

    Attributes:
        class_names: K class names, index = label.
        prompts: K text prompts, index = label.
        labels: (N,) int64 labels of all items (no image is decoded to get them).
        resolution: R, the side of every output image in pixels.
        description: one line for reports and model cards (no file paths, no per-image data).
        class_names_source: where the (public) class names came from, for reports and cards.
        captions: N per-example captions (sensitive: they are data, never released), or None
            (each example is conditioned on its class prompt).
        interpolation: the RESAMPLING name of the resize.
    """

    def __init__(self, images, labels: torch.Tensor, class_names: list[str], prompts: list[str],
                 resolution: int, description: str, class_names_source: str = "given",
                 captions: list[str] | None = None, interpolation: str = "bilinear"):
        """`images[i]` must return an RGB PIL image of any size; `labels` is (N,) int64."""
        self._images = images
        self.labels = labels
        self.class_names = class_names
        self.prompts = prompts
        self.resolution = resolution
        self.description = description
        self.class_names_source = class_names_source
        self.captions = captions
        self.interpolation = interpolation

    def fingerprint(self) -> str:
        """SHA-256 (hex) of what identifies this data: N, labels, class names, resolution, description
        and the image source's identity (file names, sizes and mtimes; a `datasets` fingerprint; or
        the Fashion-MNIST pixels). Kept in the private work folder to refuse a resume on other data;
        never released (it is a function of the sensitive data)."""
        digest = hashlib.sha256()
        digest.update(self.labels.numpy().tobytes())
        for part in (self.class_names, self.resolution, self.description, self._images.identity()):
            digest.update(repr(part).encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = resize_center_crop(self._images[index], self.resolution, self.interpolation)
        return to_tensor(image), int(self.labels[index])


def load_sensitive_dataset(source: str | datasets.Dataset | None = None, *, split: str = "train",
                           resolution: int = 32, image_column: str = "image", label_column: str = "label",
                           prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
                           prompts: list[str] | None = None,
                           class_names: list[str] | None = None,
                           max_examples: int | None = None, caption_column: str | None = None,
                           interpolation: str = "bilinear", config_name: str | None = None,
                           cache_dir: str | None = None) -> SensitiveImageDataset:
    """Load, verify and describe the sensitive images; see the module docstring for the rules.

    Args:
        source: None or "fashion-mnist" (Debian files), a folder (imagefolder or a
            `save_to_disk` dataset), a Hub dataset name or a loaded ``datasets.Dataset``.
        split: "train" (60,000), "validation" (the last 10,000 of train) or "test" for Fashion-MNIST; any
            split name for `datasets` sources.
        resolution: R, output images are (3, R, R).
        image_column, label_column: columns of a `datasets` source ("img" is tried when
            the default "image" column is absent).
        prompt_template: format string with one "{}" for the class name.
        prompts: one prompt per class, overriding `prompt_template`.
        class_names: the public class list (index = label); required for a label column that is
            not a ClassLabel, optional elsewhere (it then renames the source's classes, same count).
        max_examples: keep only the first K items (deterministic); N is then at most K.
        caption_column: a text column of a `datasets` source: each example's own caption (sensitive).
        interpolation: the resize filter, a RESAMPLING name (default bilinear).
        config_name, cache_dir: ``datasets.load_dataset``'s `name` and `cache_dir` (Hub sources).
    """
    if interpolation not in RESAMPLING:
        raise ValueError(f"interpolation must be one of {sorted(RESAMPLING)}, got {interpolation!r}")
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be None or >= 1, got {max_examples}")
    captions = None
    if isinstance(source, datasets.Dataset):
        images, labels, names, names_source, captions = _load_arrow(
            source, image_column, label_column, max_examples, class_names, caption_column)
        origin = "a `datasets.Dataset` object"
        conversions = _CONVERSIONS.format(r=resolution, mode=interpolation)
    elif source is None or source == "fashion-mnist":
        if caption_column is not None:
            raise ValueError("Fashion-MNIST has no captions: caption_column needs a `datasets` source")
        images, labels, names, origin = _load_fashion_mnist(split, max_examples)
        names_source = "the DPImageBench names of Fashion-MNIST's 10 classes"
        conversions = "28x28 grayscale zero-padded by 2 px per side to 32x32, replicated to RGB"
        if resolution != 32:
            conversions += f", resized to {resolution}x{resolution} ({interpolation})"
    else:
        images, labels, names, names_source, origin, captions = _load_other(
            source, split, image_column, label_column, max_examples, class_names, caption_column,
            {"name": config_name, "cache_dir": cache_dir})
        conversions = _CONVERSIONS.format(r=resolution, mode=interpolation)
    if class_names is not None:
        names = _renamed(names, class_names)
        names_source = "the class_names argument (--class_names)"
    if max_examples is not None:
        origin += f", first {max_examples} examples (max_examples)"
    description = (f"{origin}; N={len(labels)}, {len(names)} classes; images "
                   f"3x{resolution}x{resolution} in [-1, 1]: {conversions}"
                   + ("; conditioned on per-example captions" if captions is not None else ""))
    return SensitiveImageDataset(images, labels, names, make_prompts(names, prompt_template, prompts),
                                 resolution, description, names_source, captions, interpolation)


def _renamed(names: list[str] | None, class_names: list[str]) -> list[str]:
    """`class_names` checked against the source's own class list (None: the source has none)."""
    if not class_names or not all(isinstance(name, str) and name for name in class_names) \
            or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be distinct non-empty strings, got {class_names!r}")
    if names is not None and len(names) != len(class_names):
        raise ValueError(f"class_names has {len(class_names)} names but the source defines "
                         f"{len(names)} classes {names}; give one name per class, in label order")
    return list(class_names)


def make_prompts(class_names: list[str], template: str = DEFAULT_PROMPT_TEMPLATE,
                 prompts: list[str] | None = None) -> list[str]:
    """One prompt per class: `prompts` if given (checked), else `template.format(name)`."""
    if prompts is not None:
        if len(prompts) != len(class_names) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of {len(class_names)} strings, one per "
                             f"class in the order {class_names}; got {len(prompts)} items")
        return list(prompts)
    marker = "\x00"
    try:
        filled = template.format(marker)
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(f"prompt_template {template!r} must contain one '{{}}' for the "
                         f"class name (e.g. {DEFAULT_PROMPT_TEMPLATE!r})") from err
    if marker not in filled:
        raise ValueError(f"prompt_template {template!r} has no '{{}}' for the class name, so "
                         f"all classes would share one prompt; e.g. {DEFAULT_PROMPT_TEMPLATE!r}")
    return [template.format(name) for name in class_names]


# Image conversion -------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB version of `image` by the module's conversion table (ValueError if unsupported)."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        mode = "PA"
    if mode in _AS_RGB_MODES:
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    if mode in _16_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode {image.mode} values span {values.min()}..{values.max()}, "
                             f"outside the 16-bit range 0..65535")
        gray = ((values + 128) // 257).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(gray, mode="L").convert("RGB")
    raise ValueError(f"unsupported image mode {image.mode!r}; convert the file to RGB")


def resize_center_crop(image: Image.Image, resolution: int, interpolation: str = "bilinear") -> Image.Image:
    """Shorter side resized to `resolution` (a RESAMPLING filter), then a centered square crop of that side."""
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    scale = resolution / min(width, height)
    new_size = (max(resolution, int(width * scale)), max(resolution, int(height * scale)))
    image = image.resize(new_size, RESAMPLING[interpolation])
    left = int(round((new_size[0] - resolution) / 2.0))
    top = int(round((new_size[1] - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from an RGB PIL image of size (W, H)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def _open_image(file) -> Image.Image:
    """Open, fully decode (errors surface here), apply EXIF orientation and convert to RGB."""
    with Image.open(file) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def _verify(images, name_of) -> None:
    """Decode every item of `images` once; ValueError listing the failures via `name_of(i)`."""
    problems = []
    for index in range(len(images)):
        try:
            images[index]
        except UnidentifiedImageError:
            problems.append(f"{name_of(index)}: not an image file PIL can read")
        except Exception as err:  # any decoder failure means the item cannot be used
            problems.append(f"{name_of(index)}: {type(err).__name__}: {err}")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise ValueError(f"{len(problems)} of {len(images)} images cannot be used:\n  {listed}"
                         + (f"\n  ... and {more} more" if more > 0 else "")
                         + "\nRemove or fix them (items are never skipped: N enters the privacy "
                           "analysis).")


# Fashion-MNIST (Debian files) -------------------------------------------------------------

class _FashionMnistImages:
    """RGB 32x32 PIL images from a (N, 28, 28) uint8 tensor, converted per item."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def identity(self) -> str:
        return hashlib.sha256(self.pixels.numpy().tobytes()).hexdigest()

    def __getitem__(self, index: int) -> Image.Image:
        padded = np.pad(self.pixels[index].numpy(), 2)
        return Image.fromarray(np.repeat(padded[:, :, None], 3, axis=2), mode="RGB")


def _load_fashion_mnist(split: str, max_examples: int | None):
    """Images, (N,) labels, class names and origin text of one Fashion-MNIST split."""
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_SPLITS)}, "
                         f"got {split!r}")
    prefix = FASHION_MNIST_DIR / FASHION_MNIST_SPLITS[split]
    image_file = Path(f"{prefix}-images-idx3-ubyte.gz")
    label_file = Path(f"{prefix}-labels-idx1-ubyte.gz")
    for file in (image_file, label_file):
        if not file.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {file} is missing; install it with "
                                    f"`apt-get install dataset-fashion-mnist`")
    pixels = _read_idx(image_file, magic=2051, ndim=3)
    labels = _read_idx(label_file, magic=2049, ndim=1)
    if len(pixels) != len(labels) or pixels.shape[1:] != (28, 28) or labels.max() >= 10:
        raise ValueError(f"{image_file} / {label_file} are inconsistent (shapes {pixels.shape}, "
                         f"{labels.shape}); reinstall dataset-fashion-mnist")
    if split == "validation":
        pixels, labels = pixels[FASHION_MNIST_VALIDATION], labels[FASHION_MNIST_VALIDATION]
    pixels, labels = pixels[:max_examples], labels[:max_examples]
    origin = f"Fashion-MNIST (Debian dataset-fashion-mnist), split {split!r}"
    return (_FashionMnistImages(torch.from_numpy(pixels)), torch.from_numpy(labels.astype(np.int64)),
            list(FASHION_MNIST_CLASSES), origin)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """A uint8 array from a gzipped IDX file (big-endian magic, then `ndim` int32 sizes)."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    shape = tuple(int(size) for size in header[1:])
    if int(header[0]) != magic or len(data) != 4 * (1 + ndim) + int(np.prod(shape)):
        raise ValueError(f"{path} is not a valid IDX file (magic {header[0]}, expected {magic}); "
                         f"reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(shape).copy()


# Folders and `datasets` sources -----------------------------------------------------------

def _load_other(source: str, split: str, image_column: str, label_column: str,
                max_examples: int | None, class_names: list[str] | None, caption_column: str | None,
                hub_options: dict):
    """Images, labels, class names (None if the source has no class list), their source, origin and
    captions (None without caption_column). hub_options: load_dataset's name and cache_dir."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"saved DatasetDict {path} has no split {split!r}; "
                                     f"available: {sorted(loaded)} (set split=...)")
                loaded = loaded[split]
            origin = f"`datasets` dataset saved on disk, split {str(loaded.split or 'unspecified')!r}"
            *loaded_parts, captions = _load_arrow(loaded, image_column, label_column, max_examples, class_names,
                                                  caption_column)
            return (*loaded_parts, origin, captions)
        if caption_column is not None:
            raise ValueError("an imagefolder has no captions: caption_column needs a `datasets` source")
        return (*_load_imagefolder(path, max_examples), None)
    if path.exists():
        raise ValueError(f"{path} is a file; pass a folder (one subfolder per class), a "
                         f"`save_to_disk` folder or a Hub dataset name")
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise ValueError(f"dataset folder {source} does not exist (and it is not a Hub name)")
    loaded = datasets.load_dataset(source, hub_options.get("name"), split=split, cache_dir=hub_options.get("cache_dir"))
    origin = f"Hub dataset {source}, split {split!r}"
    *loaded_parts, captions = _load_arrow(loaded, image_column, label_column, max_examples, class_names,
                                          caption_column)
    return (*loaded_parts, origin, captions)


class _FileImages:
    """RGB PIL images decoded per item from a list of file paths."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self) -> list:
        return [(path.parent.name, path.name, path.stat().st_size, path.stat().st_mtime_ns)
                for path in self.paths]

    def __getitem__(self, index: int) -> Image.Image:
        return _open_image(self.paths[index])


def _load_imagefolder(root: Path, max_examples: int | None):
    """Images, (N,) labels, class names and origin text of `root/<class>/<files>`."""
    paths, labels, class_names = _scan_imagefolder(root)
    paths, labels = paths[:max_examples], labels[:max_examples]
    images = _FileImages(paths)
    _verify(images, lambda index: str(paths[index]))
    origin = "local imagefolder (one subfolder per class, sorted)"
    return (images, torch.tensor(labels, dtype=torch.int64), class_names,
            "the imagefolder's class folder names", origin)


def _scan_imagefolder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Sorted file paths, their labels and the sorted class names; hidden entries skipped.

    Every class folder is a class, empty or not: the schema is the owner's choice, so whether a
    class exists never depends on whether some example of it is present.
    """
    entries = sorted(entry for entry in root.iterdir() if not entry.name.startswith("."))
    if not entries:
        raise ValueError(f"image folder {root} is empty; expected one subfolder per class "
                         f"holding its images (root/<class_name>/<image files>)")
    problems = [f"{entry}: file outside a class folder; move it into root/<class_name>/ or "
                f"remove it" for entry in entries if not entry.is_dir()]
    paths, labels, class_names = [], [], []
    for folder in (entry for entry in entries if entry.is_dir()):
        files = sorted(file for file in folder.iterdir() if not file.name.startswith("."))
        problems += [f"{file}: nested folder inside a class folder; move its images up or "
                     f"remove it" for file in files if file.is_dir()]
        labels += [len(class_names)] * len(files)
        paths += files
        class_names.append(folder.name)
    if problems:
        raise ValueError(f"image folder {root} does not have the layout root/<class_name>/"
                         f"<image files>:\n  " + "\n  ".join(problems[:MAX_LISTED_PROBLEMS]))
    return paths, labels, class_names


class _ArrowImages:
    """RGB PIL images decoded per item from a `datasets` image column kept undecoded."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        self.column = column
        self.dataset = dataset.select_columns([column]).cast_column(
            column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.dataset)

    def identity(self) -> str:
        return self.dataset._fingerprint

    def __getitem__(self, index: int) -> Image.Image:
        cell = self.dataset[index][self.column]
        if cell["bytes"] is not None:
            return _open_image(io.BytesIO(cell["bytes"]))
        if cell["path"] is not None:
            return _open_image(cell["path"])
        raise ValueError("empty image cell")


def _load_arrow(dataset: datasets.Dataset, image_column: str, label_column: str,
                max_examples: int | None, class_names: list[str] | None, caption_column: str | None = None):
    """Images, (N,) labels, class names, their source and the captions (None without caption_column)
    of a `datasets.Dataset`."""
    columns = dataset.column_names
    if image_column == "image" and "image" not in columns and "img" in columns:
        image_column = "img"
    wanted = ((image_column, "image_column"), (label_column, "label_column"), (caption_column, "caption_column"))
    for column, flag in wanted:
        if column is not None and column not in columns:
            raise ValueError(f"column {column!r} not found in the dataset; available columns: "
                             f"{columns}; pass {flag}=<name>")
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(f"column {image_column!r} holds {dataset.features[image_column]}, not "
                         f"images (datasets.Image); pass image_column=<name>")
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    labels, names, names_source = _arrow_labels(dataset, label_column, class_names)
    captions = None if caption_column is None else list(dataset[caption_column])
    bad = [index for index, caption in enumerate(captions or []) if not isinstance(caption, str) or not caption]
    if bad:
        raise ValueError(f"caption column {caption_column!r} has empty or non-text cells in rows "
                         f"{bad[:MAX_LISTED_PROBLEMS]} ({len(bad)} rows); fill or remove them")
    images = _ArrowImages(dataset, image_column)
    _verify(images, lambda index: f"row {index} of column {image_column!r}")
    return images, labels, names, names_source, captions


def _arrow_labels(dataset: datasets.Dataset, column: str,
                  class_names: list[str] | None) -> tuple[torch.Tensor, list[str] | None, str]:
    """(N,) int64 labels, the class names (None: given by the caller) and where they come from.

    A ClassLabel feature names its classes; any other column is matched, value by value as a
    string, to the caller's public `class_names`, which it then requires.
    """
    values = list(dataset[column])
    missing = [index for index, value in enumerate(values) if value is None]
    if missing:
        raise ValueError(f"label column {column!r} is empty in rows {missing[:MAX_LISTED_PROBLEMS]}"
                         f" ({len(missing)} rows); fill or remove them")
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        bad = [index for index, value in enumerate(values) if not 0 <= value < feature.num_classes]
        if bad:
            raise ValueError(f"label column {column!r} has values outside 0..{feature.num_classes - 1}"
                             f" in rows {bad[:MAX_LISTED_PROBLEMS]} ({len(bad)} rows, e.g. "
                             f"{values[bad[0]]}); fix or remove them, or pick another label_column")
        return (torch.tensor(values, dtype=torch.int64), list(feature.names),
                f"the ClassLabel feature of column {column!r}")
    if class_names is None:
        raise ValueError(f"label column {column!r} is a {feature}, not a datasets.ClassLabel, so its "
                         "class list would be read off the sensitive examples (one example can add or "
                         "remove a class, and the names are released). Pass the public class list: "
                         "--class_names NAME [NAME ...] (class_names=[...]), or cast the column to "
                         "datasets.ClassLabel")
    index_of = {name: index for index, name in enumerate(class_names)}
    unknown = sorted({str(value) for value in values} - set(index_of))
    if unknown:
        raise ValueError(f"label column {column!r} holds values that are not in class_names "
                         f"{class_names}: {unknown[:MAX_LISTED_PROBLEMS]}; add them to --class_names "
                         "or fix the labels")
    return torch.tensor([index_of[str(value)] for value in values], dtype=torch.int64), None, ""
