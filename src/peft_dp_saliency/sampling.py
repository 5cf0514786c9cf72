"""Image generation from a pipeline and sample grids (used by every stage that shows images)."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image


def use_dpm_solver(pipe) -> None:
    """Switch a pipeline to DPM-Solver multistep (fast, 20-25 steps suffice)."""
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, num_inference_steps: int = 25,
             guidance_scale: float = 4.0, batch_size: int = 64, **size) -> list[Image.Image]:
    """One image per prompt, in order, reproducible for a given seed and batch size.

    The generator lives on the pipeline's device so CPU and GPU runs follow the same code;
    `size` (height, width in pixels) defaults to the pipeline's own.
    """
    images = []
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        out = pipe(prompts[start:start + batch_size], num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generator=generator, output_type="pil", **size)
        images.extend(out.images)
    return images


def make_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    """Paste equally sized images row by row into one image; `scale` enlarges with nearest."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def prompt_grid(pipe, prompts: list[str], per_prompt: int, seed: int, **kwargs) -> Image.Image:
    """A grid with one row per prompt and `per_prompt` samples in each row."""
    repeated = [prompt for prompt in prompts for _ in range(per_prompt)]
    return make_grid(generate(pipe, repeated, seed, **kwargs), columns=per_prompt, scale=2)
