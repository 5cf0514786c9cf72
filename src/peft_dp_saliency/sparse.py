"""Private sparse selection: the unit is one weight entry (or one row) of the candidate matrices.

Selection is post-processing of selection.py's Gaussian query (no extra privacy cost, same
accounting as matrix selection): every entry is scored by its noisy average gradient (|g|, or
the debiased square g^2 - std^2, which ranks the same), every row by its noisy block
(||g_row||, or ||g_row||^2 - d_in std^2); the top round(ratio * U) units over the WHOLE pool
(U = the pool's entries or rows, public) become a boolean mask per matrix.

Training: each selected matrix becomes a :class:`MaskedLinear`, whose only trainable parameter
is ``delta``, the vector of its k masked entries (the public weight stays frozen). DP-SGD's
per-sample clipping (``PerSampleClipper(masks=...)``), noise and optimizer state therefore
cover exactly the masked coordinates. The release is the update W - W_public, exactly zero
outside the mask, written as an exact full-rank LoRA like ``--no_lora``.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .per_sample import MASKED_PARAMETER

MASK_ENCODING = "numpy.packbits of the row-major unit mask (entry: d_out x d_in, row: d_out), base64"


def unit_score(squared_norm, size: int, score: str, noise_std: float):
    """A unit's saliency from the squared norm of its noisy average gradient (float or tensor of them).

    size: coordinates per unit; noise_std: the query's per-coordinate noise std, sigma_s C / (q N).
    'norm': the norm (the paper), whose noise term sqrt(size) noise_std grows with the unit's size;
    'debiased': squared_norm - size noise_std^2, an unbiased estimate of the squared norm of the un-noised
    average gradient (post-processing of the noisy sums: free in privacy).
    """
    return squared_norm ** 0.5 if score == "norm" else squared_norm - size * noise_std**2


def coordinate_scores(noisy: dict[str, torch.Tensor], unit: str, score: str,
                      noise_std: float) -> dict[str, torch.Tensor]:
    """Score per unit inside each matrix: entry -> (d_out, d_in), row -> (d_out,); float32.

    noisy: matrix name -> noisy average gradient (d_out, d_in); noise_std: its per-coordinate std.
    'norm': |g| (entry) or ||g_row||; 'debiased': g^2 - std^2 or ||g_row||^2 - d_in std^2.
    """
    out = {}
    for name, grad in noisy.items():
        sq = grad.float().pow(2) if unit == "entry" else grad.float().pow(2).sum(1)
        size = 1 if unit == "entry" else grad.shape[1]
        out[name] = unit_score(sq, size, score, noise_std)
    return out


def random_scores(shapes: dict[str, torch.Size], unit: str, seed: int) -> dict[str, torch.Tensor]:
    """Data-independent scores (the random strategy): uniform, from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape if unit == "entry" else shape[:1], generator=generator)
            for name, shape in shapes.items()}


def top_masks(scores: dict[str, torch.Tensor], k: int, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The k top-scored units over all matrices as a bool mask (d_out, d_in) per matrix (CPU).

    scores: per matrix (d_out, d_in) entry scores or (d_out,) row scores (rows expand along d_in), all
    on one device (the top-k runs there). Exactly k units are kept (torch.topk), so the count never
    depends on the scores' values.
    """
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    keep = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    pieces = keep.cpu().split([s.numel() for s in scores.values()])
    return {name: _expand(units.view(scores[name].shape), shapes[name]) for name, units in zip(scores, pieces)}


def _expand(units: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A unit mask, (d_out, d_in) entries or (d_out,) rows, as the bool weight mask (d_out, d_in)."""
    return units.clone() if units.dim() == 2 else units[:, None].expand(shape).clone()


def encode_masks(masks: dict[str, torch.Tensor], unit: str) -> dict:
    """JSON form of the masks of a selection (a DP output): counts and packed bits per matrix.

    The numbers of units and coordinates are recorded for the report; for entries the coordinate
    count is round(ratio * pool entries), a function of the public config only; for rows the row
    count is, and the coordinate count is the sum of the chosen rows' lengths, a post-processing of
    the DP mask (no privacy cost).
    """
    matrices = {}
    for name, mask in masks.items():
        units = mask if unit == "entry" else mask[:, 0]
        bits = np.packbits(units.cpu().numpy().astype(bool).ravel())
        matrices[name] = {"shape": list(mask.shape), "units": int(units.sum()), "coordinates": int(mask.sum()),
                          "bits": base64.b64encode(bits.tobytes()).decode("ascii")}
    return {"unit": unit, "encoding": MASK_ENCODING, "matrices": matrices,
            "trainable_parameters": sum(m["coordinates"] for m in matrices.values()),
            "pool_parameters": sum(int(mask.numel()) for mask in masks.values())}


def decode_masks(encoded: dict, selected: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The bool masks (d_out, d_in) of :func:`encode_masks` output (only `selected` matrices if given)."""
    masks = {}
    for name, entry in encoded["matrices"].items():
        if selected is not None and name not in selected:
            continue
        shape = tuple(entry["shape"])
        count = shape[0] * shape[1] if encoded["unit"] == "entry" else shape[0]
        bits = np.unpackbits(np.frombuffer(base64.b64decode(entry["bits"]), dtype=np.uint8), count=count)
        units = torch.from_numpy(bits.astype(bool))
        masks[name] = _expand(units.view(shape) if encoded["unit"] == "entry" else units, torch.Size(shape))
    return masks


class MaskedLinear(nn.Linear):
    """``y = x (W + scatter(delta))^T + b``: a frozen nn.Linear whose masked entries are trained.

    weight (d_out, d_in) and bias are the public ones, frozen, in their own dtype; mask: bool buffer
    (d_out, d_in); delta: float32 parameter (k,) = the update of the masked entries in row-major
    order (``weight[mask]`` order), initialised to 0 so the model starts at the public one.
    """

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")  # no init: the base's parameters are taken over below
        if mask.shape != base.weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {tuple(base.weight.shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        self.weight, self.bias = base.weight, base.bias
        self.requires_grad_(False)
        self.register_buffer("mask", mask.to(base.weight.device))
        setattr(self, MASKED_PARAMETER, nn.Parameter(torch.zeros(int(mask.sum()), device=base.weight.device)))

    def update(self) -> torch.Tensor:
        """The dense update (d_out, d_in), float32: delta at the masked entries, exactly 0 elsewhere."""
        delta = getattr(self, MASKED_PARAMETER)
        return torch.zeros(self.mask.shape, dtype=delta.dtype, device=delta.device).masked_scatter(self.mask, delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (self.weight + self.update()).to(x.dtype), self.bias)


def add_masked_deltas(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, MaskedLinear]:
    """Freeze `model` and replace each named nn.Linear by a MaskedLinear with its mask, in place.

    Returns full name -> MaskedLinear; only their ``delta`` vectors require grad afterwards.
    """
    model.requires_grad_(False)
    added = {}
    for name, mask in masks.items():
        base = model.get_submodule(name)
        if type(base) is not nn.Linear:
            raise TypeError(f"{name} is a {type(base).__name__}; sparse updates apply to plain nn.Linear only")
        parent, _, child = name.rpartition(".")
        added[name] = MaskedLinear(base, mask)
        setattr(model.get_submodule(parent) if parent else model, child, added[name])
    return added


def masks_of(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """name -> mask of the MaskedLinear among `modules` (what ``PerSampleClipper(masks=...)`` takes)."""
    return {name: m.mask for name, m in modules.items() if isinstance(m, MaskedLinear)}


def masked_updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """The release: full name -> W - W_public (d_out, d_in), float32, detached, zero outside the mask."""
    return {name: m.update().detach() for name, m in model.named_modules() if isinstance(m, MaskedLinear)}
