"""The embedded public model's model card (weights/README.md): its training-compute table."""

from __future__ import annotations

from pathlib import Path

TRAINING_TABLE_HEADER = "| stage | steps | minutes | final loss (EMA) |\n|---|---|---|---|\n"


def training_table(rows: list[str]) -> str:
    """The card's training-compute table: the header, then one Markdown row per stage."""
    return TRAINING_TABLE_HEADER + "\n".join(rows)


def add_training_row(card: Path, row: str) -> None:
    """Append `row` (a Markdown table row) after the last row of the card's training-compute table."""
    text = card.read_text()
    if TRAINING_TABLE_HEADER not in text:
        raise ValueError(f"{card} has no training-compute table (its header: {TRAINING_TABLE_HEADER.splitlines()[0]})")
    start = text.index(TRAINING_TABLE_HEADER) + len(TRAINING_TABLE_HEADER)
    end = text.find("\n\n", start)
    end = len(text.rstrip("\n")) if end < 0 else end
    card.write_text(text[:end] + "\n" + row + text[end:])
