"""LoDA / LoDA+ adapters: low-dimensional, non-linear generalisations of LoRA for DP-SGD.

LoDA (Liu et al., "LoDA: Low-Dimensional Adaptation of Large Language Models"; used for DP
fine-tuning of diffusion models by Liu, Lowy et al., arXiv:2406.05257) replaces LoRA's low-rank
*linear* update x -> B A x by a low-dimensional *non-linear* one, x -> B f(A x), where f maps the
r-dim space to itself and contains the identity, so LoRA is the special case f = id. For a frozen
W0 (d_out x d_in), with s = alpha / r:

    y = W0 x (+ b0) + s * B f(A x)
    LoDA:   f(z) = z + U gelu(V z)                     trainable: r (d_in + d_out) + 2 r^2
    LoDA+:  f(z) = z + U (gelu(V z) * (1 + G z))       trainable: r (d_in + d_out) + 3 r^2

The copy of the paper in this project is its abstract only; the residual forms of f above are
our reading of it (a non-linear map in the r-dim space that contains LoRA, and LoDA+ more
expressive -- here a multiplicative gate, second order in z -- at nearly LoRA's parameter count
since r << d). Initialisation: A ~ N(0, 1/r^2) (PEFT's ``init_lora_weights="gaussian"``, what
the training script uses for LoRA), V as nn.Linear's default, B = U = G = 0; so f = id and the
update is 0: the adapted model starts exactly at the public one.

Every trainable parameter is the weight of a bias-free ``nn.Linear`` child (A, B, f_in = V,
f_out = U, f_gate = G), each called once per forward, which is what ``PerSampleClipper`` and
``dp_sgd.trainable_modules`` require; the base layer stays frozen in its own dtype and device.

A small module of our own, not a PEFT custom LoRA layer: PEFT's hook for that,
``LoraConfig._register_custom_module``, is experimental and keyed by the *base* layer type (it
would replace LoRA for every nn.Linear of that config), the layer would have to re-implement
PEFT's LoraLayer protocol (update_layer, merge/unmerge, adapter dicts) for a non-linear update
that cannot be merged, and the mapping is not a config field: it is not written to
adapter_config.json, and diffusers' ``load_lora_weights`` rebuilds a plain LoraConfig, so a LoDA
release would load as plain LoRA without f. Here LoDA files are our own (``save_loda`` /
``load_adapter``), and ``merge_to_lora_state`` gives the PEFT/diffusers LoRA form where it is exact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

VARIANTS = ("loda", "loda_plus")
WEIGHTS_NAME = "loda_adapter.safetensors"
CONFIG_NAME = "loda_config.json"


class LoDALinear(nn.Module):
    """``base_layer(x) + s * B(f(A(x)))`` around a frozen ``nn.Linear`` base_layer (d_out x d_in).

    x: (..., d_in) in the base layer's dtype; returns (..., d_out) in that dtype. The adapter
    computes in float32: A (r x d_in), B (d_out x r), f_in = V, f_out = U and (LoDA+) f_gate = G,
    each (r x r), all bias-free nn.Linear on the base layer's device. s = alpha / rank.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, variant: str = "loda",
                 generator: torch.Generator | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown LoDA variant {variant!r}; choose one of {VARIANTS}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.variant, self.scale = rank, float(alpha), variant, alpha / rank
        shapes = {"A": (base_layer.in_features, rank), "B": (rank, base_layer.out_features),
                  "f_in": (rank, rank), "f_out": (rank, rank)}
        if variant == "loda_plus":
            shapes["f_gate"] = (rank, rank)
        for name, (d_in, d_out) in shapes.items():  # skip_init: the global RNG is left untouched
            setattr(self, name, nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False, dtype=torch.float32))
        with torch.no_grad():
            nn.init.normal_(self.A.weight, std=1 / rank, generator=generator)
            nn.init.kaiming_uniform_(self.f_in.weight, a=math.sqrt(5), generator=generator)
            for name in shapes.keys() - {"A", "f_in"}:
                getattr(self, name).weight.zero_()
        self.to(base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        z = self.A(x.to(self.A.weight.dtype))
        hidden = F.gelu(self.f_in(z))
        if self.variant == "loda_plus":
            hidden = hidden * (1 + self.f_gate(z))
        return (result + self.B(z + self.f_out(hidden)) * self.scale).to(result.dtype)

    def is_lora(self) -> bool:
        """True when f is the identity (U = 0): the update is then exactly LoRA's s * B A x."""
        return not bool(self.f_out.weight.any())


def add_loda_adapters(model: nn.Module, target_modules: list[str], rank: int, alpha: float | None = None,
                      variant: str = "loda", generator: torch.Generator | None = None) -> dict[str, LoDALinear]:
    """Wrap each named ``nn.Linear`` of `model` in a LoDALinear, in place; the drop-in for
    ``unet.add_adapter(LoraConfig(...))``.

    target_modules: full module names (a PEFT ``target_modules`` list of exact names). alpha
    defaults to rank (s = 1). Like PEFT, the whole model is frozen and only the adapter weights
    require grad. generator (CPU) seeds A and V. Returns full name -> LoDALinear.
    """
    if not target_modules:
        raise ValueError("no target modules given")
    model.requires_grad_(False)
    added = {}
    for name in target_modules:
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name!r} is not a module of {type(model).__name__}") from None
        if type(base) is not nn.Linear:
            raise TypeError(f"{name} is a {type(base).__name__}; LoDA adapts plain nn.Linear layers only")
        parent, _, child = name.rpartition(".")
        added[name] = LoDALinear(base, rank, rank if alpha is None else alpha, variant, generator)
        setattr(model.get_submodule(parent), child, added[name])
    return added


def loda_modules(model: nn.Module) -> dict[str, LoDALinear]:
    """Full name -> LoDALinear of every adapted layer of `model`; ValueError if there is none."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, LoDALinear)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no LoDA adapters")
    return found


def loda_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only (no base layers): '<module>.A.weight' (r x d_in), '<module>.B.weight'
    (d_out x r), '<module>.f_in/f_out[/f_gate].weight' (r x r); float32, detached, on the model's device."""
    return {f"{name}.{key}": p.detach() for name, m in loda_modules(model).items()
            for key, p in m.named_parameters() if not key.startswith("base_layer.")}


def save_loda(output_dir: str | Path, model: nn.Module, config_dict: dict | None = None) -> None:
    """Write loda_adapter.safetensors (``loda_state_dict``) and loda_config.json, atomically.

    The config holds rank, alpha, variant and target_modules (read off the adapters) plus the
    JSON-serialisable config_dict (e.g. the selection result); a config_dict value that
    contradicts an adapter field raises ValueError.
    """
    modules = loda_modules(model)
    first = next(iter(modules.values()))
    config = {"rank": first.rank, "alpha": first.alpha, "variant": first.variant,
              "target_modules": list(modules)}
    clash = [k for k, v in (config_dict or {}).items() if k in config and v != config[k]]
    if clash:
        raise ValueError(f"config_dict contradicts the installed adapters on {clash}")
    config = {**(config_dict or {}), **config}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-loda-") as tmp:
        save_file({k: v.cpu().contiguous() for k, v in loda_state_dict(model).items()},
                  str(Path(tmp) / WEIGHTS_NAME))
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(Path(tmp) / name, output_dir / name)


def load_adapter(pipe_or_unet, directory: str | Path) -> dict[str, LoDALinear]:
    """Install the adapters saved by ``save_loda`` in ``pipe.unet`` (or a bare model) and load them.

    The model must not carry them yet; the saved keys must match the installed ones exactly.
    Returns full name -> LoDALinear.
    """
    model = getattr(pipe_or_unet, "unet", pipe_or_unet)
    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    state = load_file(str(Path(directory) / WEIGHTS_NAME))
    added = add_loda_adapters(model, config["target_modules"], config["rank"], config["alpha"], config["variant"])
    expected = loda_state_dict(model)
    if state.keys() != expected.keys():
        raise ValueError(f"{directory}: missing {sorted(expected.keys() - state.keys())[:3]}, "
                         f"unexpected {sorted(state.keys() - expected.keys())[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
    return added


def merge_to_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as a PEFT-format LoRA state dict, exact when every f is the identity.

    Returns {'<module>.lora_A.weight': A (r x d_in), '<module>.lora_B.weight': B (d_out x r)},
    float32 copies. Load it with ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=...)``
    (the values of loda_config.json), so that PEFT's scaling alpha / r equals s. Raises ValueError
    naming the modules whose f is non-linear (U != 0): no LoRA reproduces them.
    """
    modules = loda_modules(model)
    nonlinear = [name for name, m in modules.items() if not m.is_lora()]
    if nonlinear:
        raise ValueError(f"f is non-linear (U != 0) in {len(nonlinear)} modules, e.g. {nonlinear[:3]}: "
                         "they have no exact LoRA form; release them with save_loda")
    return {f"{name}.lora_{key}.weight": getattr(m, key).weight.detach().clone()
            for name, m in modules.items() for key in ("A", "B")}
