"""Jointly clipped per-sample gradient sums for a set of ``nn.Linear`` / ``nn.Conv2d`` modules (the hot path).

For a Linear layer with input x_i (T, d_in) and output gradient g_i (T, d_out) of example i,
the per-sample weight gradient is G_i = g_i^T x_i. Its squared norm is computed either

- by the ghost-norm identity ||G_i||^2 = <x_i x_i^T, g_i g_i^T> (cost ~ T^2 (d_in + d_out)), or
- by materialising G_i (cost ~ T d_in d_out, memory B d_in d_out for this layer only),

whichever is cheaper for that layer (ghost when 2 T^2 <= d_in d_out). The clipped sum
sum_i c_i G_i, with a factor c_i from the joint norm ||grad_i|| over ALL modules, is one einsum
with the reweighted output gradients: no second backward pass and no per-example loop.

A Conv2d (groups 1, zero padding) is the same Linear applied at each output position: its tokens are
the L output positions, x_i the unfolded input patches (L, C_in kh kw) and g_i the output gradient
(L, C_out), so G_i = g_i^T x_i is its weight gradient reshaped (C_out, C_in, kh, kw). This covers
PEFT's LoRA on convolutions too (lora_A a kh x kw Conv2d, lora_B a 1 x 1 one).

Masked modules (private sparse selection, ``sparse.MaskedLinear``): only the masked entries of
the weight gradient are the mechanism's coordinates. Their per-sample gradient is G_i restricted
to the mask, and ONLY those entries enter the joint norm (entries outside the mask are never
released, so counting them would keep the sensitivity right but clip harder than needed): each
example's contribution over the released coordinates has norm <= C. A mask made of whole rows
is applied to g_i (ghost norms stay exact); any other mask needs G_i materialised.

Clipping regimes (``CLIPPING``), both of sensitivity C (every c_i ||grad_i|| <= C):
- "flat": c_i = min(1, C / ||grad_i||), Abadi et al. 2016;
- "automatic": c_i = C / (||grad_i|| + gamma), i.e. per-example normalisation (Bu et al., "Automatic
  clipping", NeurIPS 2023; gamma = 0.01 there), so C no longer needs to match the gradients' scale.

Written here rather than with Opacus because (a) the selection query needs per-sample
gradients of *frozen* matrices, where Opacus places no hooks, (b) Opacus' ghost clipping builds
T x T Gram matrices for every layer, and (c) one engine then serves selection and DP-SGD alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClippedSums:
    """Result of one batch.

    sums: parameter name ('<module>.weight' / '<module>.bias') -> sum over the batch of the
        jointly clipped per-sample gradients, same shape as the parameter, float32.
    norms: (B,) per-sample gradient norms before clipping (float32; never leave the process).
    nonfinite: how many examples had a NaN/inf gradient norm; they got clipping factor 0 (their
        contribution is dropped, still a clipped-sum mechanism). Local logs only.
    """

    sums: dict[str, torch.Tensor]
    norms: torch.Tensor
    nonfinite: int = 0


CLIPPING = ("flat", "automatic")
MASKED_PARAMETER = "delta"  # a masked module's sum is '<module>.delta' (k,), sparse.MaskedLinear's parameter
AUTOMATIC_CLIPPING_GAMMA = 0.01


def check_supported(name: str, module: nn.Module) -> None:
    """Raise TypeError unless the engine computes per-sample gradients of `module` (named `name`):
    nn.Linear, or nn.Conv2d with groups 1, zero padding given as numbers (not 'same'/'valid')."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d):
        if module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return
        raise TypeError(f"{name}: per-sample gradients of a Conv2d need groups=1 and numeric zero padding, got "
                        f"groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}")
    raise TypeError(f"{name} is a {type(module).__name__}; per-sample gradients are implemented for nn.Linear "
                    "and nn.Conv2d only")


def tokens_and_features(module: nn.Module, x: torch.Tensor, g: torch.Tensor, batch: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's input x and output gradient g as (B, T, d_in) and (B, T, d_out) float32.

    Linear: T = every leading position. Conv2d: T = output positions, d_in = C_in kh kw (the unfolded
    patches, in the order of weight.reshape(C_out, -1)), d_out = C_out. With K diffusion draws per example
    (B K consecutive rows), each example's K rows become K times the tokens.

    Raises RuntimeError unless x and g lead with the same B K rows: a tensor shared across the batch
    (no example dimension) would otherwise be split into pseudo-examples and the clipping bound lost."""
    if x.shape[0] != g.shape[0] or x.shape[0] % batch:
        raise RuntimeError(f"{type(module).__name__} input of shape {tuple(x.shape)} and output gradient of shape "
                           f"{tuple(g.shape)} do not lead with a multiple of the {batch} examples: per-example "
                           "gradients need a module whose input rows belong to single examples")
    if isinstance(module, nn.Conv2d):
        x = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        g = g.float().flatten(2).transpose(1, 2)  # (B K, L, C_out)
    return x.reshape(batch, -1, x.shape[-1]).float(), g.reshape(batch, -1, g.shape[-1]).float()


def use_ghost_norm(tokens: int, d_in: int, d_out: int) -> bool:
    """Ghost norms beat materialised per-sample gradients when 2 T^2 <= d_in d_out."""
    return 2 * tokens * tokens <= d_in * d_out


class PerSampleClipper:
    """Captures inputs/outputs of the given Linear / Conv2d modules and returns clipped gradient sums.

    modules: full name -> nn.Linear or nn.Conv2d (``check_supported``). The weight of every module is part
    of the mechanism; the bias
    is too when it requires grad. The modules' outputs must require grad during the forward
    (true for trainable modules; use :func:`frozen_weights_tracked` for frozen ones).
    masks (Linear modules only): module name -> bool (d_out, d_in): that module's coordinates are only the
    masked weight entries (no bias); its sum comes back as '<module>.delta', shape (k,), in ``weight[mask]``
    order.
    """

    def __init__(self, modules: dict[str, nn.Module], max_grad_norm: float, clipping: str = "flat",
                 gamma: float = AUTOMATIC_CLIPPING_GAMMA, masks: dict[str, torch.Tensor] | None = None):
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if clipping not in CLIPPING or not gamma > 0:
            raise ValueError(f"clipping must be one of {CLIPPING} with gamma > 0, got {clipping!r}, {gamma}")
        for name, module in modules.items():
            check_supported(name, module)
        self.masks = masks or {}
        for name, mask in self.masks.items():
            module = modules[name]
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name}: masks (sparse updates) apply to nn.Linear modules only")
            if mask.dtype != torch.bool or mask.shape != module.weight.shape:
                raise ValueError(f"the mask of {name} must be bool of shape {tuple(module.weight.shape)}")
            if module.bias is not None and module.bias.requires_grad:
                raise ValueError(f"{name}: a masked module's bias must be frozen (the mask covers the weight)")
        # whole-row masks: (d_out,) rows to apply to the output gradient, else None (materialise)
        self._rows = {name: mask[:, 0] if bool((mask.all(1) | ~mask.any(1)).all()) else None
                      for name, mask in self.masks.items()}
        self.modules = modules
        self.max_grad_norm, self.clipping, self.gamma = max_grad_norm, clipping, gamma
        self._records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._recording = False  # True from capture() to the backward of clipped_sums()

    @contextmanager
    def capture(self):
        """Record (input, output) of every module during the forward inside this context.

        Gradient checkpointing (non-reentrant, as diffusers' enable_gradient_checkpointing) runs a
        segment's forward again inside the backward; those calls are not recorded: the forward's
        records are the graph the backward differentiates, and the recomputation repeats them.
        """
        self._records.clear()
        self._recording = True

        def hook(name):
            def record(module, inputs, output):
                if not self._recording:  # a checkpointed segment recomputed in clipped_sums' backward
                    return
                if name in self._records:
                    raise RuntimeError(f"{name} ran twice in one forward; per-sample gradients assume "
                                       "each module is called once per example")
                if not output.requires_grad:
                    raise RuntimeError(f"the output of {name} does not require grad: wrap frozen modules in "
                                       "frozen_weights_tracked(); reentrant gradient checkpointing (which runs "
                                       "the forward without grad) is not supported, use use_reentrant=False")
                self._records[name] = (inputs[0].detach(), output)
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def clipped_sums(self, per_sample_loss: torch.Tensor) -> ClippedSums:
        """Backward of per_sample_loss (B,) and the jointly clipped per-sample gradient sums."""
        missing = [n for n in self.modules if n not in self._records]
        if missing:
            raise RuntimeError(f"modules not used in the forward: {missing[:3]}...")
        names = list(self.modules)
        outputs = [self._records[n][1] for n in names]
        self._recording = False
        grads = torch.autograd.grad(per_sample_loss.sum(), outputs, allow_unused=True)
        batch = per_sample_loss.shape[0]
        sq_norms = torch.zeros(batch, dtype=torch.float32, device=per_sample_loss.device)
        pieces = {}
        for name, grad_out in zip(names, grads):
            x, module = self._records[name][0], self.modules[name]
            if grad_out is None:
                grad_out = torch.zeros_like(self._records[name][1])
            x, g = tokens_and_features(module, x, grad_out, batch)
            pieces[name] = layer = _LayerGrad(x, g, module.bias is not None and module.bias.requires_grad,
                                              self.masks.get(name), self._rows.get(name))
            sq_norms += layer.sq_norms()
        self._records.clear()
        norms = sq_norms.sqrt()
        finite = torch.isfinite(norms)
        # NaN survives clamp and 0 * inf is NaN: a non-finite example gets factor 0 and its
        # pieces are zeroed before weighting, so one bad example cannot poison the sum.
        if self.clipping == "automatic":
            factors = self.max_grad_norm / (norms + self.gamma)
        else:
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        factors = torch.where(finite, factors, torch.zeros_like(norms))
        sums = {}
        for name, layer in pieces.items():
            weight_shape = self.modules[name].weight.shape  # a Conv2d's (C_out, C_in, kh, kw)
            sums.update({f"{name}.{k}": v.reshape(weight_shape) if k == "weight" else v
                         for k, v in layer.weighted_sums(factors, finite).items()})
        return ClippedSums(sums=sums, norms=norms, nonfinite=int((~finite).sum()))


class _LayerGrad:
    """Per-sample gradient pieces of one module: x (B, T, d_in), g (B, T, d_out); with a mask
    (d_out, d_in) only the masked entries (rows: (d_out,) when the mask is whole rows)."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, with_bias: bool, mask: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        if rows is not None:  # masking g's output dims masks whole rows of G = g^T x
            g = g * rows.to(g.dtype)
        self.x, self.g, self.with_bias, self.mask = x, g, with_bias, mask
        tokens, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
        ghost = use_ghost_norm(tokens, d_in, d_out) and (mask is None or rows is not None)
        self.materialised = None if ghost else torch.einsum("bto,bti->boi", g, x)
        if mask is not None and rows is None:
            self.materialised = self.materialised * mask

    def sq_norms(self) -> torch.Tensor:
        if self.materialised is not None:
            sq = self.materialised.pow(2).sum((1, 2))
        else:
            sq = (torch.bmm(self.x, self.x.transpose(1, 2)) * torch.bmm(self.g, self.g.transpose(1, 2))).sum((1, 2))
        if self.with_bias:
            sq = sq + self.g.sum(1).pow(2).sum(1)
        return sq

    def weighted_sums(self, factors: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """sum_b factors[b] G_b over the examples with keep[b] (the others are zeroed first)."""
        keep3 = keep[:, None, None]
        g = torch.where(keep3, self.g, 0.0)
        if self.materialised is not None:
            weight = torch.einsum("b,boi->oi", factors, torch.where(keep3, self.materialised, 0.0))
        else:
            weight = torch.einsum("bto,bti->oi", g * factors[:, None, None], torch.where(keep3, self.x, 0.0))
        if self.mask is not None:
            return {MASKED_PARAMETER: weight[self.mask]}
        out = {"weight": weight}
        if self.with_bias:
            out["bias"] = torch.einsum("b,bo->o", factors, g.sum(1))
        return out


@contextmanager
def frozen_weights_tracked(model: nn.Module, modules: dict[str, nn.Module]):
    """Freeze `model` except the weights of `modules`, whose outputs then carry a graph.

    The mechanism covers exactly these weight matrices (no biases, nothing else). .grad is never
    filled: :meth:`PerSampleClipper.clipped_sums` asks autograd for the module outputs' gradients
    only. requires_grad flags are restored on exit.
    """
    previous = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in previous.items():
            param.requires_grad_(flag)
