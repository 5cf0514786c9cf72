"""The embedded public model: loads offline, generates, has an SD-like candidate pool."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH
from peft_dp_saliency.public_model.card import TRAINING_TABLE_HEADER, add_training_row, training_table
from peft_dp_saliency.public_model.corpus import SYNONYMS, caption_stems


def test_weights_are_small_safetensors():
    files = list(Path(EMBEDDED_MODEL_PATH).rglob("*"))
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"unet", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in files if f.is_file()) < 50e6
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]


def test_loads_with_from_pretrained_and_generates(public_pipe):
    assert isinstance(public_pipe, StableDiffusionPipeline)
    out = public_pipe(["an image of a t-shirt", "an image of a handbag"], num_inference_steps=4,
                      guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (2, 32, 32, 3)
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert abs(images[0] - images[1]).mean() > 1e-3  # the prompt matters


def test_candidate_pool_has_depth_structure(public_pipe):
    names = list(find_candidates(public_pipe.unet))
    assert len(names) >= 30
    assert any(n.startswith("down_blocks") for n in names) and any(n.startswith("up_blocks") for n in names)
    assert any(n.startswith("mid_block") for n in names)
    assert any("attn2" in n for n in names)  # cross-attention


def test_tokenizer_keeps_prompt_words(public_pipe):
    tokens = public_pipe.tokenizer.tokenize("an image of a sneaker")
    assert "sneaker</w>" in tokens


def test_captions_come_from_unicode_names():
    assert caption_stems("ATHLETIC SHOE")[0] == "athletic shoe"
    assert "sneaker" in SYNONYMS["ATHLETIC SHOE"]


def test_refining_the_decoder_leaves_the_latent_space_bit_identical():
    """The UNet and every adapter live in the encoder's latent space: refinement must only change decoding."""
    from diffusers import AutoencoderKL

    from peft_dp_saliency.public_model.decoder import decoder_parameters, refine_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    decoding = {id(p) for p in decoder_parameters(vae)}
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    losses = refine_decoder(vae, lambda: images, steps=30, learning_rate=1e-2, progress=False)
    changed = {name for name, p in vae.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(id(vae.get_parameter(name)) in decoding for name in changed)
    assert all(torch.equal(p, before[n]) for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])  # it learns to reconstruct
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_a_training_row_is_appended_to_the_embedded_cards_table_and_nothing_else_changes(tmp_path):
    card = tmp_path / "README.md"
    original = (EMBEDDED_MODEL_PATH / "README.md").read_text()
    card.write_text(original)
    add_training_row(card, "| new stage | 10 | 0.5 | 0.1000 |")
    lines, before = card.read_text().splitlines(), original.splitlines()
    table = [i for i, line in enumerate(before) if line.startswith("| ") and i > before.index("| stage | steps | minutes | final loss (EMA) |")]
    last = max(table)
    assert lines[last + 1] == "| new stage | 10 | 0.5 | 0.1000 |"  # right after the table's last row
    assert lines[:last + 1] + lines[last + 2:] == before  # nothing else moved
    # a card that ends with its table gets the row too; one without the table is refused
    card.write_text("# card\n\n" + training_table(["| vae | 1 | 0.1 | 0.5 |"]) + "\n")
    add_training_row(card, "| unet | 2 | 0.2 | 0.4 |")
    assert card.read_text() == "# card\n\n" + TRAINING_TABLE_HEADER + "| vae | 1 | 0.1 | 0.5 |\n| unet | 2 | 0.2 | 0.4 |\n"
    card.write_text("# card without a table\n")
    with pytest.raises(ValueError, match="no training-compute table"):
        add_training_row(card, "| x | 1 | 1 | 1 |")
