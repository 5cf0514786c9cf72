"""The embedded public model: a tiny SD-architecture pipeline pretrained on emoji and glyphs."""

from pathlib import Path

EMBEDDED_MODEL_PATH = Path(__file__).resolve().parent / "weights"
# the prompts of the model card's sample grid (weights/sample_grid.png), one row each
GRID_PROMPTS = ["an image of a t-shirt", "an image of a dress", "an image of a sneaker",
                "an image of a handbag", "an image of a cat face", "an image of a trouser",
                "an image of a coat", "an image of a boot"]


def load_public_pipeline(path: str | Path = EMBEDDED_MODEL_PATH, **kwargs):
    """`StableDiffusionPipeline.from_pretrained` of the embedded model (offline)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
