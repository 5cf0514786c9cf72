#!/usr/bin/env python
"""Pretrain the embedded public model (tiny SD architecture, 32x32) on emoji and font glyphs.

    accelerate launch examples/pretrain_public_model.py --vae_minutes 12 --unet_minutes 60

Stages: corpus + tokenizer -> VAE -> UNet and text encoder (VAE frozen) -> pipeline folder with
a model card and a sample grid. Each stage has a wall-time budget, checkpoints to --work_dir and
resumes from there (run the same command again). No sensitive data is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH, GRID_PROMPTS, architecture
from peft_dp_saliency.public_model.card import training_table
from peft_dp_saliency.public_model.corpus import augment, build_corpus, random_captions
from peft_dp_saliency.sampling import prompt_grid, use_dpm_solver

logger = logging.getLogger(__name__)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=EMBEDDED_MODEL_PATH)
    p.add_argument("--work_dir", type=Path, default=Path("runs/pretrain_public_model"))
    p.add_argument("--vae_minutes", type=float, default=12.0)
    p.add_argument("--unet_minutes", type=float, default=60.0)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--learning_rate", type=float, default=4e-4)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--views_per_tile", type=int, default=40,
                   help="Augmented views per tile encoded once for UNet training (weighted by clothing oversampling).")
    p.add_argument("--checkpointing_minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Budget:
    """Wall-time budget of one stage, persisted in work_dir/progress.json across resumes."""

    def __init__(self, work_dir: Path, stage: str, minutes: float):
        self.path = work_dir / "progress.json"
        self.progress = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.stage, self.limit = stage, minutes * 60
        entry = self.progress.setdefault(stage, {"seconds": 0.0, "steps": 0, "loss": None})
        self.entry, self.start, self.base = entry, time.time(), entry["seconds"]

    @property
    def done(self) -> bool:
        return self.elapsed >= self.limit

    @property
    def elapsed(self) -> float:
        return self.base + time.time() - self.start

    def save(self, steps: int, loss: float) -> None:
        self.entry.update(seconds=self.elapsed, steps=steps, loss=loss)
        self.path.write_text(json.dumps(self.progress, indent=2))


def train_stage(accelerator, name, models, optimizer, step_fn, budget, checkpoint_every):
    """Run step_fn(models, step) -> loss until the budget is spent; checkpoint periodically."""
    state_dir = budget.path.parent / f"{name}_state"
    *models, optimizer = accelerator.prepare(*models, optimizer)
    if state_dir.exists():
        accelerator.load_state(str(state_dir))
        logger.info("resumed %s at step %d", name, budget.entry["steps"])
    step, smoothed, last_save = budget.entry["steps"], budget.entry["loss"], time.time()
    bar = tqdm(total=int(budget.limit), initial=int(budget.elapsed), desc=name, unit="s",
               disable=not accelerator.is_local_main_process)
    while not budget.done:
        loss = step_fn(models, step)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.n = int(min(budget.elapsed, budget.limit))
        bar.set_postfix(step=step, loss=f"{smoothed:.4f}")
        if time.time() - last_save > checkpoint_every or budget.done:
            accelerator.save_state(str(state_dir))
            budget.save(step, smoothed)
            last_save = time.time()
    bar.close()
    budget.save(step, smoothed)
    return [accelerator.unwrap_model(m) for m in models]


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO)
    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    every = args.checkpointing_minutes * 60

    corpus_file = args.work_dir / "corpus.pt"
    if not corpus_file.exists():
        torch.save(build_corpus(), corpus_file)
    corpus = torch.load(corpus_file, weights_only=False)
    logger.info("corpus: %d tiles", len(corpus))
    all_captions = [t.format(s) for stems in corpus.captions for s in stems
                    for t in ("an image of a {}", "a picture of a {}", "a photo of a {}")]
    # BPE training orders equal-frequency tokens differently from run to run, so a resumed run
    # must reuse the tokenizer its text encoder was trained with.
    tokenizer_dir = args.work_dir / "tokenizer"
    tokenizer = (CLIPTokenizer.from_pretrained(str(tokenizer_dir)) if (tokenizer_dir / "vocab.json").exists()
                 else architecture.build_tokenizer(all_captions, tokenizer_dir))

    def sample_batch(size):
        indices = torch.multinomial(corpus.weights, size, replacement=True, generator=generator)
        return indices, augment(corpus.tiles[indices], generator).to(accelerator.device)

    # Stage 1: VAE (reconstruction + a small KL term, as in SD's autoencoder).
    vae = architecture.build_vae()
    vae_budget = Budget(args.work_dir, "vae", args.vae_minutes)

    def vae_step(models, step):
        (model,) = models
        _, images = sample_batch(args.vae_batch_size)
        posterior = model.encode(images).latent_dist
        recon = model.decode(posterior.sample(generator=None)).sample
        return F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()

    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate)
    (vae,) = train_stage(accelerator, "vae", [vae], vae_opt, vae_step, vae_budget, every)
    vae.requires_grad_(False).eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(args.work_dir, vae, sample_batch))

    # Stage 2: UNet + text encoder on frozen VAE latents, caption dropout for guidance.
    unet = architecture.build_unet()
    text_encoder = architecture.build_text_encoder(len(tokenizer))
    noise_scheduler = architecture.build_scheduler()
    unet_budget = Budget(args.work_dir, "unet", args.unet_minutes)

    bank_tiles, bank_mean, bank_std = latent_bank(args, vae, corpus, generator, accelerator.device)

    def unet_step(models, step):
        unet_m, text_m = models
        rows = torch.randint(len(bank_tiles), (args.train_batch_size,), generator=generator)
        captions = random_captions(corpus, bank_tiles[rows], generator)
        captions = [c if torch.rand(1, generator=generator).item() >= args.caption_dropout else ""
                    for c in captions]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(accelerator.device)
        eps = torch.randn(bank_mean[rows].shape, generator=generator).to(accelerator.device)
        latents = (bank_mean[rows] + bank_std[rows] * eps) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),),
                          device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet_m(noisy, t, text_m(ids)[0]).sample
        return F.mse_loss(pred, noise)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    unet_opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    unet, text_encoder = train_stage(accelerator, "unet", [unet, text_encoder], unet_opt, unet_step,
                                     unet_budget, every)

    if accelerator.is_main_process:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=unet, scheduler=noise_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        use_dpm_solver(pipe)
        pipe.save_pretrained(args.output_dir)
        grid = prompt_grid(pipe, GRID_PROMPTS, per_prompt=8, seed=0)
        grid.save(args.output_dir / "sample_grid.png")
        write_model_card(args, corpus, pipe, json.loads(unet_budget.path.read_text()))
        logger.info("saved public model to %s", args.output_dir)


@torch.no_grad()
def latent_scaling_factor(work_dir, vae, sample_batch):
    """SD's scaling factor (1 / std of VAE latents, so latents have unit variance), fixed once.

    Kept in work_dir/vae_scaling_factor.json: the UNet is trained on latents scaled by it, so a
    resumed run must reuse it rather than re-estimate it from a fresh sample.
    """
    path = work_dir / "vae_scaling_factor.json"
    if path.exists():
        return json.loads(path.read_text())["scaling_factor"]
    latents = vae.encode(sample_batch(512)[1]).latent_dist.sample()
    factor = float(1.0 / latents.std())
    path.write_text(json.dumps({"scaling_factor": factor}))
    return factor


@torch.no_grad()
def latent_bank(args, vae, corpus, generator, device):
    """Posterior mean/std of `--views_per_tile` augmented views of every tile, encoded once.

    Returns (tile index per row (R,), mean (R, 4, h, w), std (R, 4, h, w)). Rows are drawn with the
    corpus weights, so sampling rows uniformly keeps the oversampling of clothing emoji. Encoding
    once instead of every step makes UNet training several times faster on CPU.
    """
    path = args.work_dir / "latent_bank.pt"
    if path.exists():
        return torch.load(path)
    count = args.views_per_tile * len(corpus)
    tiles = torch.multinomial(corpus.weights, count, replacement=True, generator=generator)
    means, stds = [], []
    for chunk in tqdm(tiles.split(256), desc="latent bank"):
        posterior = vae.encode(augment(corpus.tiles[chunk], generator).to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    bank = (tiles, torch.cat(means).to(device), torch.cat(stds).to(device))
    torch.save(bank, path)
    return bank


def write_model_card(args, corpus, pipe, progress):
    sizes = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
             for name in ("vae", "unet", "text_encoder")}
    size_rows = "\n".join(f"| {k} | {v / 1e6:.2f} M |" for k, v in sizes.items())
    stage_table = training_table([f"| {k} | {v['steps']} | {v['seconds'] / 60:.1f} | {v['loss']:.4f} |"
                                 for k, v in progress.items()])
    card = ModelCard(f"""---
library_name: diffusers
license: apache-2.0
tags: [text-to-image, stable-diffusion-architecture, tiny, peft-dp-saliency]
---
# Embedded public model of peft-dp-saliency

A tiny Stable-Diffusion-architecture text-to-image pipeline (32x32 RGB; AutoencoderKL, UNet2DConditionModel
with cross-attention, CLIPTextModel + CLIPTokenizer, DPM-Solver scheduler), the offline stand-in for SD-1.5.
Load it with `StableDiffusionPipeline.from_pretrained(path)`.

## Public training data
{len(corpus)} images rendered from fonts shipped by Debian: single-code-point emoji of Noto Color Emoji
(U+1F300-U+1FAFF, U+2600-U+27BF; modifiers, keycaps, arrows and squared/circled symbols removed) and DejaVu
Sans letters and digits. Captions: the Unicode character name (`unicodedata.name`), lower-cased, plus common
English synonyms for clothing emoji (e.g. athletic shoe -> sneaker), in templates such as "an image of a {{}}".
Augmented on the fly: scale, shift, rotation, white/black/random backgrounds, brightness, 20% grayscale,
15% inverted. Clothing emoji are sampled 6x more often. No sensitive data (Fashion-MNIST or other) was used.

## Sizes
| component | parameters |
|---|---|
{size_rows}

## Training compute (2 CPU cores)
{stage_table}

Batch {args.vae_batch_size} (VAE, MSE + 1e-6 KL), {args.train_batch_size} (UNet + text encoder, epsilon MSE,
{args.caption_dropout:.0%} caption dropout); AdamW, lr {args.vae_learning_rate} / {args.learning_rate}.

## Samples (DPM-Solver, 25 steps, guidance 4; one row per prompt)
{", ".join(GRID_PROMPTS)}

![samples](sample_grid.png)

## Limits
32x32 only, a small vocabulary built from the captions; objects are rough. It exists so the
DP fine-tuning code runs end to end offline; use a real Stable Diffusion checkpoint for real work.
""")
    card.save(args.output_dir / "README.md")


if __name__ == "__main__":
    main()
