"""The embedded public model: a tiny SD-architecture pipeline pretrained on emoji and glyphs."""

from pathlib import Path

EMBEDDED_MODEL_PATH = Path(__file__).resolve().parent / "weights"


def load_public_pipeline(path: str | Path = EMBEDDED_MODEL_PATH, **kwargs):
    """`StableDiffusionPipeline.from_pretrained` of the embedded model (offline)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
