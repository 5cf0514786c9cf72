"""Which weight matrices of a denoiser may be adapted: candidate pools and selection units.

A candidate is an ``nn.Linear`` (or, in the 'all_linear_conv' pool, an ``nn.Conv2d``) named by its full
module name (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v``), exactly what PEFT's
``target_modules`` matches. Works for any diffusers UNet2DConditionModel or Transformer2DModel/DiT:
attention is found by the diffusers ``Attention`` class, never by the tiny model's sizes or block names.
"""

from __future__ import annotations

import re

from diffusers.models.attention_processor import Attention
from torch import nn

from .per_sample import check_supported

POOLS = {
    "attn_qkv": ("to_q", "to_k", "to_v"),
    "attn_qkvo": ("to_q", "to_k", "to_v", "to_out.0"),
    "all_linear": None,  # every nn.Linear of the model: the paper's "All Param." variant
    "all_linear_conv": None,  # and every nn.Conv2d (a UNet's ResNet blocks, samplers, conv_in/out)
}
POOL_TYPES = {"all_linear": (nn.Linear,), "all_linear_conv": (nn.Linear, nn.Conv2d)}  # the None pools
SPARSE_UNITS = ("entry", "row")  # private sparse selection: a mask inside each matrix (sparse.py)
UNITS = ("matrix", "layer", *SPARSE_UNITS)


def find_candidates(model: nn.Module, pool: str = "attn_qkv") -> dict[str, nn.Module]:
    """Candidate matrices in model order: full module name -> the ``nn.Linear`` (or ``nn.Conv2d``).

    Raises ValueError for an unknown pool, a model without candidates, or a convolution the per-sample
    engine cannot differentiate per example (grouped, or padding other than zeros).
    """
    if pool not in POOLS:
        raise ValueError(f"unknown candidate pool {pool!r}; choose one of {sorted(POOLS)}")
    found = {}
    if POOLS[pool] is None:
        found = {name: m for name, m in model.named_modules() if isinstance(m, POOL_TYPES[pool])}
        for name, module in found.items():
            try:
                check_supported(name, module)
            except TypeError as error:
                raise ValueError(f"{error}; use --candidate_pool all_linear for this model") from error
    else:
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                for child in POOLS[pool]:
                    linear = module.get_submodule(child) if _has_submodule(module, child) else None
                    if isinstance(linear, nn.Linear):
                        found[f"{name}.{child}"] = linear
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no candidate matrices for pool {pool!r}: the attention pools need "
            "diffusers Attention modules (a UNet2DConditionModel or Transformer2DModel); "
            "use pool='all_linear' (or 'all_linear_conv') for other models")
    return found


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def unit_of(name: str, unit: str) -> str:
    """The selection unit a matrix belongs to: itself, or its attention layer (its parent module).

    For the sparse units (entry, row) the matrix is the container: the mask inside it is sparse.py's.
    """
    if unit == "matrix" or unit in SPARSE_UNITS:
        return name
    if unit == "layer":
        # joint-attention (MMDiT) context projections belong to their attention layer too
        return re.sub(r"\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$", "", name)
    raise ValueError(f"unknown selection unit {unit!r}; choose one of {UNITS}")


def group_units(names: list[str], unit: str) -> dict[str, list[str]]:
    """Selection unit -> its member matrix names, in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(unit_of(name, unit), []).append(name)
    return groups


def block_label(name: str) -> str:
    """Short label of the block a module lives in, as in the paper's Table 7: D0, Mid, U1, ..."""
    match = re.match(r"(down|up)_blocks\.(\d+)", name)
    if match:
        return f"{match.group(1)[0].upper()}{match.group(2)}"
    if name.startswith("mid_block"):
        return "Mid"
    match = re.match(r"transformer_blocks\.(\d+)", name)
    if match:
        return f"B{match.group(1)}"
    match = re.match(r"single_transformer_blocks\.(\d+)", name)  # Flux's single-stream blocks
    return f"S{match.group(1)}" if match else name.split(".")[0]


def matrix_label(name: str) -> str:
    """Short label of a matrix inside its block: 'a1.attn2.v' (attention 1 of the block, cross-attention,
    value), or the last two name parts for other matrices."""
    match = re.search(r"(?:attentions\.(\d+)\..*)?(attn\d)\.to_(q|k|v|out\.0)$", name)
    if match:
        prefix = f"a{match.group(1)}." if match.group(1) is not None else ""
        return f"{prefix}{match.group(2)}.{match.group(3).replace('out.0', 'o')}"
    return ".".join(name.split(".")[-2:])


def block_order(label: str) -> tuple[int, int, str]:
    """Sort key for block labels: down blocks, mid block, up blocks (input to output); labels of the same rank and
    number (conv_in, time_embedding, conv_out, ...) by name, so that the order never depends on a set's order."""
    rank = {"D": 0, "M": 1, "U": 2, "S": 4}.get(label[0], 3)
    digits = "".join(ch for ch in label if ch.isdigit())
    return rank, int(digits) if digits else 0, label
