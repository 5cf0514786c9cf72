"""SaliencyLoraConfig: a PEFT LoraConfig that also records how its target_modules were chosen."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from peft import LoraConfig

from .candidates import POOLS, UNITS
from .per_sample import CLIPPING

STRATEGIES = ("saliency", "random", "all")
SELECTION_FILE = "selection.json"  # released next to adapter_config.json: the selection and these fields
SCORES = ("norm", "debiased")


@dataclass
class SaliencyLoraConfig(LoraConfig):
    """LoRA config whose ``target_modules`` come from a (private) saliency query.

    Works wherever a LoraConfig does (``unet.add_adapter(config)``, ``get_peft_model``), and
    round-trips through ``save_pretrained`` / ``SaliencyLoraConfig.from_pretrained`` with every
    selection field (plain ``LoraConfig.from_pretrained`` drops them).
    """

    candidate_pool: str = field(default="attn_qkv", metadata={
        "help": f"Which matrices may be adapted: one of {sorted(POOLS)}. 'attn_qkv' = q/k/v of every "
                "self- and cross-attention, 'attn_qkvo' adds the output projection, 'all_linear' = every Linear, "
                "'all_linear_conv' = every Linear and Conv2d (a UNet's ResNet blocks too; LoRA or no_lora only)."})
    selection_unit: str = field(default="matrix", metadata={
        "help": "Granularity of selection: 'matrix' (each weight matrix), 'layer' (an attention layer's matrices "
                "together), or private sparse selection: 'entry' (each weight entry) / 'row' (each row of a matrix), "
                "whose top fraction becomes a mask; DP-SGD then trains only the masked entries (no LoRA)."})
    selection_ratio: float = field(default=0.3, metadata={
        "help": "Fraction of units (in (0, 1]) that get adapters (for 'entry' / 'row': that are trained): the "
                "top-ratio by noisy saliency score."})
    selection_strategy: str = field(default="saliency", metadata={
        "help": "'saliency' (DP-SAPF private gradient query), 'random' (data-independent, no privacy cost) "
                "or 'all' (every candidate, no query: DP-LoRA)."})
    saliency_score: str = field(default="norm", metadata={
        "help": "'norm' = ||noisy block|| (the paper); 'debiased' = ||noisy block||^2 - d (sigma_s C / (q N))^2 "
                "(q = selection_sample_rate), which removes the noise's bias toward large matrices."})
    selection_noise_multiplier: float = field(default=5.0, metadata={
        "help": "sigma_s: the query adds Gaussian noise of std sigma_s * C / (q N) to every coordinate "
                "(q = selection_sample_rate)."})
    selection_max_grad_norm: float = field(default=1.0, metadata={
        "help": "C: per-sample gradients over ALL candidates are clipped jointly to this L2 norm."})
    selection_clipping: str = field(default="automatic", metadata={
        "help": "'automatic' (each per-example gradient normalised: C / (||g|| + 0.01), Bu et al. 2023) or 'flat' "
                "(min(1, C / ||g||)); both have sensitivity C. Flat clipping at C = 1 leaves gradients of norm ~0.07 "
                "unclipped and ~14x below the noise on the embedded model."})
    selection_noise_multiplicity: int = field(default=1, metadata={
        "help": "K (timestep, noise) draws averaged per example before clipping (free in privacy, K x compute)."})
    selection_sample_rate: float = field(default=1.0, metadata={
        "help": "q_s in (0, 1]: the query runs on a Poisson subsample (each example with probability q_s, from "
                "a secret generator), divides by q_s N and is accounted as a subsampled Gaussian (amplified)."})
    selection_seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the data-independent random strategy only (public). The query's randomness (DP "
                "noise, each example's timestep and diffusion noise) never derives from it unless "
                "deterministic_noise is set."})
    deterministic_noise: bool = field(default=False, metadata={
        "help": "Derive the query's DP noise and diffusion randomness from selection_seed (tests only: the "
                "result is NOT private)."})
    selection_result: Optional[dict[str, Any]] = field(default=None, metadata={
        "help": "Filled by select_target_modules: strategy, selected units, noisy scores (DP outputs) and the "
                "mechanism's parameters. Safe to publish."})

    def __post_init__(self):
        super().__post_init__()
        checks = {
            "candidate_pool": (self.candidate_pool in POOLS, sorted(POOLS)),
            "selection_unit": (self.selection_unit in UNITS, UNITS),
            "selection_strategy": (self.selection_strategy in STRATEGIES, STRATEGIES),
            "saliency_score": (self.saliency_score in SCORES, SCORES),
            "selection_clipping": (self.selection_clipping in CLIPPING, CLIPPING),
        }
        for name, (ok, choices) in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}")
        if not (isinstance(self.selection_noise_multiplicity, int) and self.selection_noise_multiplicity >= 1):
            raise ValueError(f"selection_noise_multiplicity must be an int >= 1, got {self.selection_noise_multiplicity}")
        if not 0 < self.selection_sample_rate <= 1:
            raise ValueError(f"selection_sample_rate must be in (0, 1], got {self.selection_sample_rate}")
        if not 0 < self.selection_ratio <= 1:
            raise ValueError(f"selection_ratio must be in (0, 1], got {self.selection_ratio}")
        if self.selection_strategy == "saliency":
            if not self.selection_noise_multiplier > 0:
                raise ValueError("selection_noise_multiplier must be > 0 for the private saliency query, "
                                 f"got {self.selection_noise_multiplier}")
            if not self.selection_max_grad_norm > 0:
                raise ValueError(f"selection_max_grad_norm must be > 0, got {self.selection_max_grad_norm}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load adapter_config.json (a plain LoraConfig, or an older one holding every field) and overlay
        the selection fields of ``selection.json`` (key "config") when that file is there."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        selection_file = folder / SELECTION_FILE
        if selection_file.is_file():
            for key, value in json.loads(selection_file.read_text()).get("config", {}).items():
                setattr(config, key, value)
        return config

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Instantiate this subclass (PEFT's version maps peft_type LORA to plain LoraConfig)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def lora_config_dict(self) -> dict[str, Any]:
        """Only the LoraConfig fields (what diffusers' adapter metadata accepts)."""
        lora_fields = {f.name for f in fields(LoraConfig)}
        return {k: v for k, v in self.to_dict().items() if k in lora_fields}

    def plain_lora_config(self, base_model_name_or_path: str | None = None) -> LoraConfig:
        """The LoraConfig part, as PEFT's own loaders expect it in adapter_config.json."""
        return LoraConfig(**{**self.lora_config_dict(), "base_model_name_or_path": base_model_name_or_path})

    def selection_dict(self) -> dict[str, Any]:
        """Only the selection fields added by this subclass."""
        lora_fields = {f.name for f in fields(LoraConfig)}
        return {k: v for k, v in self.to_dict().items() if k not in lora_fields}
