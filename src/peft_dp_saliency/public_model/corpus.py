"""The public pretraining corpus of the embedded model: emoji and font glyphs with captions.

Every image comes from fonts that ship with Debian (Noto Color Emoji, DejaVu); every caption
from ``unicodedata.name`` (plus a small table of common English synonyms for clothing emoji,
the kind of text prior a web-scale model has). No sensitive data enters this corpus.

Glyphs are rendered once to RGBA tiles (``BASE_SIZE`` square); :func:`augment` turns a batch of
tiles into 32x32 RGB training images in [-1, 1] with random scale, shift, rotation, background
and colour, on the fly and in batch.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
GLYPH_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
EMOJI_RANGES = ((0x1F300, 0x1FAFF), (0x2600, 0x27BF))
BASE_SIZE = 48
# Noto Color Emoji is a bitmap font: PIL renders it only at this size.
EMOJI_PIXEL_SIZE = 109

# Names whose emoji say nothing visual at 32x32 (modifiers, keycap parts, text-like symbols).
SKIPPED_NAME_PARTS = ("MODIFIER", "REGIONAL INDICATOR", "KEYCAP", "SQUARED", "CIRCLED", "ARROW",
                      "CLOCK FACE", "VARIATION", "COMBINING", "TAG ")

# Common English synonyms of clothing and accessory emoji (public text prior, like a web corpus).
SYNONYMS = {
    "T-SHIRT": ("t-shirt", "top", "shirt"),
    "JEANS": ("jeans", "trouser", "trousers", "pants"),
    "DRESS": ("dress",),
    "COAT": ("coat", "jacket"),
    "WOMANS SANDAL": ("sandal", "sandals"),
    "THONG SANDAL": ("sandal", "flip-flop"),
    "ATHLETIC SHOE": ("sneaker", "running shoe", "shoe"),
    "MANS SHOE": ("shoe", "leather shoe"),
    "HIGH-HEELED SHOE": ("high heel", "shoe"),
    "WOMANS BOOTS": ("boot", "ankle boot", "boots"),
    "HIKING BOOT": ("boot", "ankle boot"),
    "HANDBAG": ("bag", "handbag"),
    "POUCH": ("bag", "purse"),
    "PURSE": ("purse", "bag"),
    "SCHOOL SATCHEL": ("backpack", "bag"),
    "WOMANS CLOTHES": ("blouse", "top", "shirt"),
    "NECKTIE": ("shirt", "shirt and tie"),
    "LAB COAT": ("lab coat", "coat"),
    "SCARF": ("scarf",),
    "GLOVES": ("gloves",),
    "SOCKS": ("socks",),
    "KIMONO": ("kimono", "robe"),
    "SARI": ("sari",),
    "SHORTS": ("shorts",),
    "BRIEFS": ("briefs",),
    "ONE-PIECE SWIMSUIT": ("swimsuit",),
    "BALLET SHOES": ("ballet shoes", "shoe"),
}

TEMPLATES = ("an image of a {}", "a {}", "a picture of a {}", "{}", "a photo of a {}")


@dataclass
class Corpus:
    """Rendered glyph tiles and their caption choices.

    tiles: (M, 4, BASE_SIZE, BASE_SIZE) float32 RGBA in [0, 1].
    names: M caption stems (lower-case Unicode names or synonyms); captions[i] lists stems for tile i.
    weights: (M,) sampling weights (clothing emoji are oversampled).
    """

    tiles: torch.Tensor
    captions: list[tuple[str, ...]]
    weights: torch.Tensor
    codepoints: list[int]

    def __len__(self) -> int:
        return len(self.captions)


def _crop_to_square(image: Image.Image, size: int) -> np.ndarray:
    box = image.getbbox()
    if box is None:
        return None
    image = image.crop(box)
    side = max(image.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(square.resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0


def render_emoji(codepoint: int, font: ImageFont.FreeTypeFont) -> np.ndarray | None:
    """(BASE_SIZE, BASE_SIZE, 4) RGBA in [0, 1], or None when the font has no glyph."""
    canvas = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), chr(codepoint), font=font, embedded_color=True)
    return _crop_to_square(canvas, BASE_SIZE)


def render_glyph(char: str, font: ImageFont.FreeTypeFont) -> np.ndarray | None:
    """A black font glyph as an RGBA tile (the colour comes later from augmentation)."""
    canvas = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 0), char, font=font, fill=(0, 0, 0, 255))
    return _crop_to_square(canvas, BASE_SIZE)


def caption_stems(name: str) -> tuple[str, ...]:
    """Caption stems for a Unicode name: the name in lower case, then its synonyms."""
    return (name.lower(),) + SYNONYMS.get(name, ())


def build_corpus(clothing_weight: float = 6.0, glyphs: str = "abcdefghijklmnopqrstuvwxyz0123456789"
                 ) -> Corpus:
    """Render every nameable single-code-point emoji in EMOJI_RANGES plus DejaVu glyphs."""
    if not EMOJI_FONT.exists():
        raise FileNotFoundError(f"{EMOJI_FONT} is missing: install the Debian package fonts-noto-color-emoji")
    emoji_font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_PIXEL_SIZE)
    glyph_font = ImageFont.truetype(str(GLYPH_FONT), 72)
    tiles, captions, weights, codepoints = [], [], [], []
    for start, stop in EMOJI_RANGES:
        for codepoint in range(start, stop + 1):
            name = unicodedata.name(chr(codepoint), "")
            if not name or any(part in name for part in SKIPPED_NAME_PARTS):
                continue
            tile = render_emoji(codepoint, emoji_font)
            if tile is None or tile[..., 3].mean() < 0.02:
                continue
            tiles.append(tile)
            captions.append(caption_stems(name))
            weights.append(clothing_weight if name in SYNONYMS else 1.0)
            codepoints.append(codepoint)
    for char in glyphs + glyphs.upper():
        tile = render_glyph(char, glyph_font)
        if tile is not None:
            tiles.append(tile)
            captions.append(caption_stems(unicodedata.name(char)))
            weights.append(0.5)
            codepoints.append(ord(char))
    return Corpus(
        tiles=torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous(),
        captions=captions,
        weights=torch.tensor(weights),
        codepoints=codepoints,
    )


def random_captions(corpus: Corpus, indices: torch.Tensor, generator: torch.Generator) -> list[str]:
    """One caption per index: a random stem of the tile in a random template."""
    out = []
    for index in indices.tolist():
        stems = corpus.captions[index]
        stem = stems[int(torch.randint(len(stems), (1,), generator=generator))]
        template = TEMPLATES[int(torch.randint(len(TEMPLATES), (1,), generator=generator))]
        out.append(template.format(stem))
    return out


def augment(tiles: torch.Tensor, generator: torch.Generator, resolution: int = 32) -> torch.Tensor:
    """Random scale/shift/rotation, background and colour variation.

    tiles: (B, 4, S, S) RGBA in [0, 1]. Returns (B, 3, resolution, resolution) RGB in [-1, 1].
    Backgrounds are white, black or a random colour; a fraction of images is turned grayscale or
    colour-inverted so the public prior covers light-on-dark images too.
    """
    batch = tiles.shape[0]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    angle = uniform(-0.35, 0.35)
    scale = uniform(0.8, 1.35)  # >1 zooms out in affine_grid terms
    shift = uniform(-0.15, 0.15, 2)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (batch, 4, resolution * 2, resolution * 2), align_corners=False)
    warped = F.grid_sample(tiles, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = F.avg_pool2d(warped, 2)
    rgb, alpha = warped[:, :3], warped[:, 3:]

    kind = torch.rand(batch, generator=generator)
    background = torch.where(kind[:, None] < 0.5, torch.ones(batch, 3),
                             torch.where(kind[:, None] < 0.75, torch.zeros(batch, 3),
                                         torch.rand(batch, 3, generator=generator)))
    image = rgb * alpha + background[:, :, None, None] * (1 - alpha)

    brightness = uniform(0.8, 1.2)[:, None, None, None]
    image = (image * brightness).clamp(0, 1)
    gray = torch.rand(batch, generator=generator) < 0.2
    image = torch.where(gray[:, None, None, None], image.mean(1, keepdim=True).expand_as(image), image)
    invert = torch.rand(batch, generator=generator) < 0.15
    image = torch.where(invert[:, None, None, None], 1 - image, image)
    return image * 2 - 1
