"""One seam for model families: ``detect_family(model)`` -> a :class:`ModelFamily`.

    family = detect_family(args.pretrained_model_name_or_path)   # before any data is touched
    pipe = family.load_pipeline(path, torch_dtype=...); denoiser = family.denoiser(pipe)
    scheduler = family.noise_scheduler(path)
    data = family.encode_dataset(pipe, dataset)                  # latents + per-class conditioning
    latents, cond = data.batch(indices)
    noise, t = family.draw_inputs(len(indices) * K, latents.shape[1:], scheduler, gen, device, dtype)
    loss = family.per_sample_loss(denoiser, scheduler, latents, cond, noise, t)   # (B,)
    family.candidates(denoiser, pool); family.save_lora(dir, peft_state, lora_config_dict)
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import ConditionedDataset, ModelFamily, joint_attention_candidates
from .flow import FluxFamily, SanaFamily, StableDiffusion3Family
from .unet import StableDiffusionFamily, StableDiffusionXLFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    cls.name: cls for cls in (StableDiffusionFamily, StableDiffusionXLFamily, StableDiffusion3Family,
                              FluxFamily, SanaFamily)
}
_BY_PIPELINE = {cls.pipeline_class_name: cls for cls in FAMILIES.values()}
SUPPORTED_PIPELINES = tuple(_BY_PIPELINE)

__all__ = ["ConditionedDataset", "FAMILIES", "FluxFamily", "ModelFamily", "SUPPORTED_PIPELINES", "SanaFamily",
           "StableDiffusion3Family", "StableDiffusionFamily", "StableDiffusionXLFamily", "detect_family",
           "get_family", "joint_attention_candidates", "pipeline_class_name"]


def get_family(name: str, **options) -> ModelFamily:
    """The family by short name ('sd', 'sdxl', 'sd3', 'flux', 'sana'); options go to its constructor."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name](**options)


def pipeline_class_name(source, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The diffusers pipeline class of `source`: a pipeline (or its class), a model_index dict, a model
    folder or its model_index.json, or a Hub id (reads only model_index.json, through `cache_dir` if given)."""
    if isinstance(source, dict):
        name = source.get("_class_name")
    elif isinstance(source, type):
        name = _known_base(source) or source.__name__
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "model_index.json"
        if path.is_file():
            name = json.loads(path.read_text()).get("_class_name")
        elif Path(source).expanduser().exists():
            raise ValueError(f"{source} has no model_index.json: not a diffusers pipeline folder")
        else:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(str(source), revision=revision, cache_dir=cache_dir).get("_class_name")
    else:
        name = _known_base(type(source)) or type(source).__name__
    if not isinstance(name, str):
        raise ValueError(f"cannot tell the pipeline class of {source!r} (no _class_name)")
    return name


def _known_base(cls: type) -> str | None:
    """A supported pipeline class among cls and its bases (subclasses of a supported pipeline work)."""
    for base in cls.__mro__:
        if base.__name__ in _BY_PIPELINE:
            return base.__name__
    return None


def detect_family(source, revision: str | None = None, cache_dir: str | None = None, **options) -> ModelFamily:
    """The ModelFamily of a model (see :func:`pipeline_class_name` for `source`).

    Raises ValueError naming the supported pipelines for any other class: cheap, so call it before any
    data is read.
    """
    name = pipeline_class_name(source, revision, cache_dir)
    if name not in _BY_PIPELINE:
        raise ValueError(f"unsupported pipeline {name!r}: DP training supports "
                         f"{', '.join(SUPPORTED_PIPELINES)}")
    return _BY_PIPELINE[name](**options)
