#!/usr/bin/env python
"""Refine the embedded public model's VAE decoder on its public corpus (emoji and glyphs), encoder frozen.

    python examples/refine_public_decoder.py --max_train_steps 5000

The UNet, text encoder, encoder and latent scaling are unchanged, so adapters trained before still
apply; only decoding gets sharper. Writes the VAE back into --output_dir (default: the embedded
model, in place), redraws its sample grid and adds a row to its model card's training table.
No sensitive data is used: the corpus and augmentation are the VAE pretraining's own.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH, GRID_PROMPTS
from peft_dp_saliency.public_model.card import add_training_row
from peft_dp_saliency.public_model.corpus import augment, build_corpus
from peft_dp_saliency.public_model.decoder import refine_decoder
from peft_dp_saliency.sampling import prompt_grid, use_dpm_solver


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", type=Path, default=EMBEDDED_MODEL_PATH,
                   help="Pipeline folder whose VAE decoder is refined.")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="Where the refined pipeline is written (default: in place).")
    p.add_argument("--max_train_steps", type=int, default=5000)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    output_dir = args.output_dir or args.pretrained_model_name_or_path
    if output_dir != args.pretrained_model_name_or_path:
        shutil.copytree(args.pretrained_model_name_or_path, output_dir, dirs_exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(str(output_dir), safety_checker=None)
    corpus = build_corpus()

    def sample_images():
        rows = torch.multinomial(corpus.weights, args.train_batch_size, replacement=True, generator=generator)
        return augment(corpus.tiles[rows], generator, resolution=pipe.vae.config.sample_size)

    start = time.time()
    losses = refine_decoder(pipe.vae, sample_images, args.max_train_steps, args.learning_rate, generator)
    minutes = (time.time() - start) / 60
    pipe.vae.save_pretrained(output_dir / "vae")
    use_dpm_solver(pipe)
    prompt_grid(pipe, GRID_PROMPTS, per_prompt=8, seed=0).save(output_dir / "sample_grid.png")
    tail = losses[-100:]
    add_training_row(output_dir / "README.md",
                     f"| vae decoder refined, encoder frozen (batch {args.train_batch_size}, MSE, lr {args.learning_rate}) "
                     f"| {len(losses)} | {minutes:.1f} | {sum(tail) / len(tail):.4f} |")
    print(f"refined the decoder of {output_dir}: {len(losses)} steps in {minutes:.1f} min, "
          f"MSE {sum(losses[:100]) / min(100, len(losses)):.4f} -> {sum(tail) / len(tail):.4f}")


if __name__ == "__main__":
    main()
