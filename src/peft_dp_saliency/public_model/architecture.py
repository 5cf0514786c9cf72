"""Sizes and builders of the embedded tiny Stable-Diffusion-architecture pipeline (32x32 RGB).

Same component classes as SD-1.5 (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel + CLIPTokenizer, a DDPM-family scheduler), scaled down so it trains on 2 CPU cores.
Nothing else in the package depends on these sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

RESOLUTION = 32
TEXT_HIDDEN = 128
MAX_TOKENS = 20

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
)

UNET_CONFIG = dict(
    sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_tokenizer(captions: list[str], folder: Path) -> CLIPTokenizer:
    """Train a CLIP-format BPE (vocab.json + merges.txt) on the captions and load it from `folder`.

    Words of the captions become whole tokens; the 256 byte-level symbols CLIP starts from keep
    any other text tokenizable. Trained here because CLIP's released vocabulary (49k tokens) is
    far bigger than this model and needs a download.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    special = ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, special_tokens=special,
                                  initial_alphabet=byte_symbols, end_of_word_suffix="</w>",
                                  show_progress=False)
    tokenizer.train_from_iterator([caption.lower() for caption in captions], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for symbol in byte_symbols:  # CLIP's base vocabulary: each byte symbol alone and word-final
        for token in (symbol, symbol + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_TOKENS, "bos_token": special[0], "eos_token": special[1],
        "pad_token": special[1], "unk_token": special[1], "tokenizer_class": "CLIPTokenizer"}))
    return CLIPTokenizer.from_pretrained(str(folder))
