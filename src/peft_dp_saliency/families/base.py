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

from ..candidates import POOLS, find_candidates
from ..diffusion import EncodedDataset, encode_images, prompt_table


@dataclass
class ConditionedDataset(EncodedDataset):
    """An :class:`EncodedDataset` whose conditioning is a dict of per-class tensors (leading dim K).

    ``prompt_embeds`` is the family's main text-embedding tensor (kept for code that reads it);
    ``batch(indices)`` returns (latents (B, ...), {key: tensor (B, ...)}).
    """

    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None,
              empty: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = self.prompt_rows(indices, empty)
        return self.batch_latents(indices, flip), {key: value[rows] for key, value in self.conditioning.items()}


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


def component_config(source, component: str, revision: str | None = None, cache_dir: str | None = None) -> dict:
    """The config dict of a pipeline component ('vae', 'unet', ...): read from a model folder / Hub id
    (its config.json only, through `cache_dir` if given) or taken from a loaded pipeline."""
    if isinstance(source, (str, Path)):
        from diffusers import AutoencoderKL  # load_config only reads the folder's config.json

        return AutoencoderKL.load_config(str(source), subfolder=component, revision=revision, cache_dir=cache_dir)
    return dict(getattr(source, component).config)


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
    loss_options: tuple[str, ...] = ()  # constructor options of the loss (--snr_gamma, ...) this family has

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

    def noise_scheduler(self, source, revision: str | None = None, **kwargs):
        """The training noise scheduler: from a model folder / Hub id (its scheduler/ subfolder, as
        diffusers' training scripts do; kwargs such as cache_dir go to from_pretrained) or from a loaded
        pipeline's scheduler config."""
        if isinstance(source, (str, Path)):
            return self.scheduler_class.from_pretrained(str(source), subfolder="scheduler", revision=revision,
                                                        **kwargs)
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

    def default_resolution(self, pretrained_model_name_or_path, revision: str | None = None,
                           cache_dir: str | None = None) -> int:
        """The training resolution (pixels) when none is given: the VAE's sample_size (as train.py does), else
        the denoiser's sample_size times the VAE downsampling. The source: a model folder / Hub id (read
        through `cache_dir`), or a loaded pipeline."""
        vae = component_config(pretrained_model_name_or_path, "vae", revision, cache_dir)
        if "sample_size" in vae:
            size = vae["sample_size"]
            return int(size[0] if isinstance(size, (list, tuple)) else size)
        den = component_config(pretrained_model_name_or_path, self.denoiser_attr, revision, cache_dir)
        blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0] * 4
        return int(den.get("sample_size", 64)) * 2 ** (len(blocks) - 1)

    def use_fast_sampler(self, pipe) -> None:
        """Switch the pipeline to a fast sampler for sample grids (flow families keep their own)."""

    def sampling_kwargs(self) -> dict:
        """Extra keyword arguments of the pipeline's __call__ for sample grids and synthesis."""
        return {}

    def check_resolution(self, resolution: int) -> None:
        """ValueError (before anything is spent) if the family's pipeline cannot sample at `resolution` px."""
        if resolution % 8:
            raise ValueError(f"{resolution} px is not a multiple of 8 (the VAE's downsampling factor); "
                             "choose another --resolution")

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

    def make_dataset(self, latents, labels, conditioning: dict[str, torch.Tensor],
                     flipped_latents: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
                     empty_prompt_row: int | None = None) -> EncodedDataset:
        return ConditionedDataset(latents=latents, labels=labels, prompt_embeds=conditioning[self.main_conditioning],
                                  flipped_latents=flipped_latents, prompt_ids=prompt_ids,
                                  empty_prompt_row=empty_prompt_row, conditioning=conditioning)

    @torch.no_grad()
    def encode_dataset(self, pipe, dataset, batch_size: int = 64, show_progress: bool = True, flip: bool = False,
                       num_workers: int = 0, empty_prompt: bool = False, **prompt_kwargs) -> EncodedDataset:
        """Encode every image of `dataset` ((image in [-1, 1], label) items; ``dataset.prompts`` are the
        class prompts) once: latents, labels and the per-class (or, with ``dataset.captions``, per-caption)
        conditioning. flip: also cache each image's mirrored latents (--random_flip); num_workers: the
        DataLoader's decoding processes; empty_prompt: also encode "" as the last conditioning row
        (--proportion_empty_prompts)."""
        latents, flipped, labels = encode_images(dataset, lambda images: self.encode_images(pipe, images),
                                                 batch_size, show_progress, flip, num_workers)
        prompts, prompt_ids = prompt_table(dataset, empty_prompt)
        chunks = [self.encode_prompts(pipe, prompts[i:i + batch_size], **prompt_kwargs)
                  for i in range(0, len(prompts), batch_size)]
        conditioning = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
        return self.make_dataset(latents, labels, conditioning, flipped,
                                 None if prompt_ids is None else prompt_ids.to(latents.device),
                                 len(prompts) - 1 if empty_prompt else None)

    # --- the loss ------------------------------------------------------------------------------
    def draw_inputs(self, num_examples: int, latent_shape: tuple[int, ...], noise_scheduler,
                    generator: torch.Generator | None, device, dtype=torch.float32):
        """Per-example randomness of the loss: noise (n, *latent_shape) and timesteps (n,).

        Drawn once per logical batch (n = B K rows), then sliced per micro-batch."""
        raise NotImplementedError

    def fixed_timesteps(self, timestep: int, num_examples: int, device) -> torch.Tensor:
        """(n,) copies of one training timestep (on the scheduler's 0..num_train_timesteps scale) in the
        dtype per_sample_loss takes: integer indices for DDPM families."""
        return torch.full((num_examples,), timestep, dtype=torch.long, device=device)

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
