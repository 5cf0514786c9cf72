"""The model-family seam: everything DP training needs to know about one diffusers pipeline family.

A :class:`ModelFamily` says how to load the pipeline and its training noise scheduler, how to turn
class prompts into per-class conditioning and images into latents, which randomness the loss draws
per example, what the per-example loss is, which matrices are candidates, and how a LoRA is saved
so that ``pipe.load_lora_weights(dir)`` of that family loads it. The DP machinery (PerSampleClipper,
selection, DP-SGD, accounting) stays family-independent.

Conditioning contract: ``encode_prompts`` returns ``{key: tensor}`` with a leading class dim K;
``dataset.batch(indices)`` indexes it by the examples' labels (a B-indexed dict), and
``per_sample_loss`` takes that dict. Every tensor in it is per-class (so per-example after indexing):
caching it is per-example preprocessing that clipping covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..candidates import POOLS, find_candidates
from ..diffusion import EncodedDataset


@dataclass
class ConditionedDataset(EncodedDataset):
    """An :class:`EncodedDataset` whose conditioning is a dict of per-class tensors (leading dim K).

    ``prompt_embeds`` is the family's main text-embedding tensor (kept for code that reads it);
    ``batch(indices)`` returns (latents (B, ...), {key: tensor (B, ...)}).
    """

    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = self.labels[indices]
        return self.latents[indices], {key: value[labels] for key, value in self.conditioning.items()}


# Joint-attention (MMDiT) context-stream projections, added to the image-stream pools as their own entries.
JOINT_CHILDREN = {
    "attn_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "attn_qkvo": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(module, (Attention, AttentionModuleMixin))


def _child_linear(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        child = module.get_submodule(path)
    except AttributeError:
        return None
    return child if isinstance(child, nn.Linear) else None


def joint_attention_candidates(model: nn.Module, pool: str) -> dict[str, nn.Linear]:
    """Candidates of a joint-attention (MMDiT) denoiser, in model order.

    Attention modules are diffusers ``Attention`` or any ``AttentionModuleMixin`` (FluxAttention);
    per attention: the pool's image-stream matrices (to_q, to_k, to_v[, to_out.0]) then the
    context-stream ones (add_q_proj, add_k_proj, add_v_proj[, to_add_out]) that exist.
    'all_linear' is every nn.Linear, as in :func:`find_candidates`.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown candidate pool {pool!r}; choose one of {sorted(POOLS)}")
    if POOLS[pool] is None:
        return find_candidates(model, pool)
    found = {}
    for name, module in model.named_modules():
        if _is_attention(module):
            for child in (*POOLS[pool], *JOINT_CHILDREN[pool]):
                linear = _child_linear(module, child)
                if linear is not None:
                    found[f"{name}.{child}"] = linear
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention matrices for pool {pool!r}; "
                         "use pool='all_linear'")
    return found


def repeat_conditioning(conditioning: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Each example's conditioning repeated for its K consecutive (noise, timestep) rows."""
    if k == 1:
        return conditioning
    return {key: value.repeat_interleave(k, dim=0) for key, value in conditioning.items()}


def multiplicity(latents: torch.Tensor, noise: torch.Tensor) -> int:
    """K = noise rows per example (noise has B K rows, example-major)."""
    batch = latents.shape[0]
    if batch == 0 or noise.shape[0] % batch:
        raise ValueError(f"noise has {noise.shape[0]} rows, not a multiple of the {batch} examples")
    return noise.shape[0] // batch


def mean_squared_error(prediction: torch.Tensor, target: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """(B,) float32 MSE per example, averaged over its K draws (before clipping)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1).view(batch, k).mean(1)


class ModelFamily:
    """One diffusers text-to-image pipeline family (subclasses fill in the class attributes).

    name: short id ('sd', 'sdxl', 'sd3', 'flux', 'sana'); pipeline_class_name: the diffusers
    pipeline (``_class_name`` of model_index.json); denoiser_attr: 'unet' or 'transformer'.
    """

    name: str = ""
    pipeline_class_name: str = ""
    denoiser_attr: str = "unet"
    scheduler_class_name: str = "DDPMScheduler"  # the training noise scheduler
    text_encoder_attrs: tuple[str, ...] = ("text_encoder",)
    tokenizer_attrs: tuple[str, ...] = ("tokenizer",)
    main_conditioning: str = "prompt_embeds"  # the key stored as EncodedDataset.prompt_embeds

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # --- loading -------------------------------------------------------------------------------
    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.scheduler_class_name)

    def load_pipeline(self, pretrained_model_name_or_path, **kwargs):
        """``pipeline_class.from_pretrained`` (kwargs: revision, variant, torch_dtype, ...)."""
        return self.pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)

    def denoiser(self, pipe) -> nn.Module:
        """The model that gets adapters: ``pipe.unet`` or ``pipe.transformer``."""
        return getattr(pipe, self.denoiser_attr)

    def frozen_modules(self, pipe) -> list[nn.Module]:
        """VAE, text encoders and denoiser (the ones present): freeze all before adding adapters."""
        names = ("vae", *self.text_encoder_attrs, self.denoiser_attr)
        return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, nn.Module)]

    def noise_scheduler(self, source, revision: str | None = None):
        """The training noise scheduler: from a model folder / Hub id (its scheduler/ subfolder, as
        diffusers' training scripts do) or from a loaded pipeline's scheduler config."""
        if isinstance(source, (str, Path)):
            return self.scheduler_class.from_pretrained(str(source), subfolder="scheduler", revision=revision)
        return self.scheduler_class.from_config(source.scheduler.config)

    def required_files(self) -> list[str]:
        """Files a local model folder of this family must hold (before any data is touched)."""
        files = ["model_index.json", f"{self.denoiser_attr}/config.json", "vae/config.json",
                 "scheduler/scheduler_config.json"]
        return files + [f"{attr}/config.json" for attr in self.text_encoder_attrs]

    def missing_files(self, folder) -> list[str]:
        folder = Path(folder).expanduser()
        missing = [f for f in self.required_files() if not (folder / f).is_file()]
        return missing + [f"{t}/" for t in self.tokenizer_attrs if not (folder / t).is_dir()]

    def default_resolution(self, pretrained_model_name_or_path, revision: str | None = None) -> int:
        """The training resolution when none is given: the VAE's sample_size (as train.py does), else
        the denoiser's sample_size times the VAE downsampling."""
        from diffusers import AutoencoderKL  # load_config only reads the folder's config.json

        vae = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae", revision=revision)
        if "sample_size" in vae:
            size = vae["sample_size"]
            return int(size[0] if isinstance(size, (list, tuple)) else size)
        den = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder=self.denoiser_attr, revision=revision)
        blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0] * 4
        return int(den.get("sample_size", 64)) * 2 ** (len(blocks) - 1)

    def use_fast_sampler(self, pipe) -> None:
        """Switch the pipeline to a fast sampler for sample grids (flow families keep their own)."""

    # --- data ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, pipe, prompts: list[str], resolution: int | None = None,
                       **kwargs) -> dict[str, torch.Tensor]:
        """Per-class conditioning {key: (K, ...)} of the K class prompts.

        resolution: the training image size (SDXL's size conditioning; ignored by the others); other
        kwargs are the family's own (max_sequence_length for SD3/Flux/Sana) or its pipeline's encode_prompt's."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, pipe, images: torch.Tensor) -> torch.Tensor:
        """Deterministic training latents of images in [-1, 1] (B, 3, R, R)."""
        vae = pipe.vae
        posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (posterior.mean - shift) * vae.config.scaling_factor

    def make_dataset(self, latents, labels, conditioning: dict[str, torch.Tensor]) -> EncodedDataset:
        return ConditionedDataset(latents=latents, labels=labels, prompt_embeds=conditioning[self.main_conditioning],
                                  conditioning=conditioning)

    @torch.no_grad()
    def encode_dataset(self, pipe, dataset, batch_size: int = 64, show_progress: bool = True,
                       **prompt_kwargs) -> EncodedDataset:
        """Encode every image of `dataset` ((image in [-1, 1], label) items; ``dataset.prompts`` are the
        class prompts) once: latents, labels and the per-class conditioning."""
        latents, labels = [], []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for images, batch_labels in tqdm(loader, desc="encoding images", disable=not show_progress):
            latents.append(self.encode_images(pipe, images))
            labels.append(batch_labels)
        latents = torch.cat(latents)
        conditioning = self.encode_prompts(pipe, list(dataset.prompts), **prompt_kwargs)
        return self.make_dataset(latents, torch.cat(labels).long().to(latents.device), conditioning)

    # --- the loss ------------------------------------------------------------------------------
    def draw_inputs(self, num_examples: int, latent_shape: tuple[int, ...], noise_scheduler,
                    generator: torch.Generator | None, device, dtype=torch.float32):
        """Per-example randomness of the loss: noise (n, *latent_shape) and timesteps (n,).

        Drawn once per logical batch (n = B K rows), then sliced per micro-batch."""
        raise NotImplementedError

    def per_sample_loss(self, denoiser, noise_scheduler, latents: torch.Tensor, conditioning,
                        noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) loss per example, averaged over its K draws (noise/timesteps: B K rows, example-major)."""
        raise NotImplementedError

    # --- candidates and release ----------------------------------------------------------------
    def candidates(self, denoiser: nn.Module, pool: str = "attn_qkv") -> dict[str, nn.Linear]:
        """Candidate matrices (full module name -> nn.Linear) of the pool, in model order."""
        return find_candidates(denoiser, pool)

    def lora_layers_kwargs(self, state_dict: dict[str, torch.Tensor], metadata: dict | None) -> dict:
        prefix = self.denoiser_attr
        return {f"{prefix}_lora_layers": state_dict, f"{prefix}_lora_adapter_metadata": metadata}

    def save_lora(self, output_dir, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
        """Write pytorch_lora_weights.safetensors for this family's ``pipe.load_lora_weights``.

        state_dict: the denoiser's adapter in PEFT format (``get_peft_model_state_dict(denoiser)`` or
        ``hub.full_rank_lora_state``); metadata: the LoraConfig dict (so alpha/ranks are restored)."""
        self.pipeline_class.save_lora_weights(str(output_dir), **self.lora_layers_kwargs(state_dict, metadata))
