"""Release of a run: diffusers-format adapter, its configs, report, samples, model card, Hub push.

Everything written here is a DP output (or public): the adapter weights, the selection (noisy
scores), the privacy report, samples from the adapted model, class prompts. Loss curves and
anything else computed on sensitive data without noise stay in the run's checkpoint folder.
``PUBLISHABLE_FILES`` is the allow-list; ``check_publishable`` refuses anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from huggingface_hub.errors import HfHubHTTPError
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from .accounting import PrivacyReport, write_json_atomic
from .candidates import SPARSE_UNITS
from .config import SELECTION_FILE, SaliencyLoraConfig
from .families import StableDiffusionFamily
from .public_model import EMBEDDED_MODEL_PATH

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' load_lora_weights
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's PeftModel.from_pretrained
PUBLISHABLE_FILES = {LORA_WEIGHTS, PEFT_WEIGHTS, "adapter_config.json", "selection.json", "privacy_report.json",
                     "class_prompts.json", "samples.png", "README.md",
                     "loda_adapter.safetensors", "loda_config.json"}  # LoDA releases (--adapter loda*)
STAGING_DIR = ".release-staging"
LOCAL_BASE = "a local model ({})"  # how the card names a local base (never its path)
EMBEDDED_BASE_NAME = "peft-dp-saliency embedded public model"


def full_rank_lora_state(deltas: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Express trained matrix updates exactly as LoRA: A = identity (d_in), B = delta W, alpha = r.

    A convolution's update (C_out, C_in, kh, kw) becomes PEFT's conv LoRA: A a kh x kw convolution that
    copies each of the d_in = C_in kh kw patch entries to its own channel (the identity, reshaped), B the
    1 x 1 convolution delta W.reshape(C_out, d_in). So DP-SGD without LoRA (--no_lora) is released in the
    same diffusers format and loads with ``load_lora_weights``. Returns the PEFT-format state dict and the
    rank/alpha patterns.
    """
    state, ranks = {}, {}
    for name, delta in deltas.items():
        d_out, d_in = delta.shape[0], delta[0].numel()
        conv = (1, 1) if delta.dim() == 4 else ()  # lora_B of a conv LoRA is a 1 x 1 convolution
        state[f"{name}.lora_A.weight"] = torch.eye(d_in, dtype=delta.dtype).reshape(d_in, *delta.shape[1:])
        state[f"{name}.lora_B.weight"] = delta.detach().cpu().reshape(d_out, d_in, *conv).contiguous()
        ranks[name] = d_in
    return state, ranks


def hub_model_id(base_model: str) -> str | None:
    """`base_model` if it names a Hub repository, None for a local folder (never released as a path)."""
    return None if Path(base_model).expanduser().exists() else base_model


def local_base_name(base_model: str) -> str:
    """The name the card gives a local base: the embedded model's own name, else the folder's name."""
    folder = Path(base_model).expanduser().resolve()
    return EMBEDDED_BASE_NAME if folder == EMBEDDED_MODEL_PATH.resolve() else folder.name


def release_base_model(release_dir: str | Path) -> str:
    """The base model a release was trained on, read from its own metadata: adapter_config.json's
    base_model_name_or_path, else the card's ``base_model`` (both Hub ids), else the local base the card
    names in its text (the embedded public model resolves to its folder; older releases call it "weights").

    Raises ValueError naming the fix when no base is recorded or a named local base is not on this machine.
    """
    release_dir = Path(release_dir)
    config, card = release_dir / "adapter_config.json", release_dir / "README.md"
    recorded = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    text = card.read_text() if card.is_file() else ""
    if recorded is None and text:
        recorded = ModelCard(text).data.base_model
        recorded = recorded[0] if isinstance(recorded, list) else recorded
    if recorded is not None:
        if Path(recorded).is_absolute() and not Path(recorded).exists():
            raise ValueError(f"{release_dir} was trained on {recorded}, which is not on this machine: pass "
                             "--pretrained_model_name_or_path with that model's folder or Hub id")
        return recorded
    local = re.search(re.escape(LOCAL_BASE).replace(re.escape("{}"), "(.+?)") + r"$", text, re.MULTILINE)
    if local and local.group(1) in (EMBEDDED_BASE_NAME, EMBEDDED_MODEL_PATH.name):
        return str(EMBEDDED_MODEL_PATH)
    if local:
        raise ValueError(f"{release_dir} was trained on {LOCAL_BASE.format(local.group(1))}, a folder of the "
                         "training machine that a release never records as a path: pass "
                         "--pretrained_model_name_or_path with that folder (or the Hub id of the same model)")
    raise ValueError(f"{release_dir} records no base model (no base_model_name_or_path in adapter_config.json, "
                     "no model card naming one): pass --pretrained_model_name_or_path")


def save_adapter(output_dir: Path, unet, config: SaliencyLoraConfig,
                 matrix_deltas: dict[str, torch.Tensor] | None = None, base_model: str | None = None,
                 family=None) -> None:
    """Write the adapter for both ecosystems, atomically:

    - pytorch_lora_weights.safetensors: diffusers format (+ LoraConfig-only metadata, so alpha is
      restored) for ``pipe.load_lora_weights``;
    - adapter_model.safetensors + adapter_config.json (a plain LoraConfig, ``base_model_name_or_path``
      set only for a Hub base) for PEFT's ``PeftConfig/LoraConfig/PeftModel.from_pretrained``.

    unet carries the trained PEFT adapter, unless matrix_deltas (module name -> W_trained - W_public)
    is given, which is saved as an exact full-rank LoRA. The selection fields go to selection.json
    (:func:`save_selection`).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if matrix_deltas is None:
        peft_state = get_peft_model_state_dict(unet)
        released_config = config
    else:  # the config must describe the full-rank weights actually written, not the rank-r LoRA
        peft_state, ranks = full_rank_lora_state(matrix_deltas)
        released_config = SaliencyLoraConfig(
            **{**config.selection_dict(), "r": max(ranks.values()), "lora_alpha": max(ranks.values()),
               "target_modules": list(ranks), "rank_pattern": ranks, "alpha_pattern": ranks})
    family = family or StableDiffusionFamily()
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-adapter-") as tmp:
        family.save_lora(tmp, peft_state, released_config.lora_config_dict())  # that family's load_lora_weights
        released_config.plain_lora_config(base_model and hub_model_id(base_model)).save_pretrained(tmp)
        save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in peft_state.items()},
                  str(Path(tmp) / PEFT_WEIGHTS), metadata={"format": "pt"})
        for name in (LORA_WEIGHTS, PEFT_WEIGHTS, "adapter_config.json"):
            os.replace(Path(tmp) / name, output_dir / name)


def save_selection(output_dir: Path, selection: dict, config: SaliencyLoraConfig) -> None:
    """selection.json: the selection (noisy scores are DP outputs) and, under "config", the
    SaliencyLoraConfig fields that are not LoraConfig's (so SaliencyLoraConfig.from_pretrained round-trips)."""
    fields = {k: v for k, v in config.selection_dict().items() if k != "selection_result"}
    save_json(output_dir, SELECTION_FILE, {**selection, "config": fields})


def save_json(output_dir: Path, name: str, payload) -> None:
    write_json_atomic(str(output_dir / name), payload)


def save_image(output_dir: Path, name: str, image: Image.Image) -> None:
    """Atomic PNG write."""
    tmp = output_dir / f".{name}.tmp"
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, output_dir / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_release(output_dir: Path):
    """Yield a hidden staging folder inside output_dir; on success move its files into output_dir.

    All outputs of a release are written to the staging folder first and checked against the
    allow-list; only a complete, publishable set is moved in (renames, no data copied). On any
    error (disk full, a crash in the sample generation, ...) the staging folder is deleted and
    output_dir is left as it was: never a half-written adapter or a partial release.
    """
    staging = Path(output_dir) / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left over by a killed release
    staging.mkdir(parents=True)
    try:
        yield staging
        check_publishable(staging)
        for path in sorted(staging.iterdir()):
            os.replace(path, Path(output_dir) / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_publishable(output_dir: Path) -> None:
    """Raise if output_dir holds anything outside the allow-list (it is what gets pushed)."""
    extra = sorted(p.name for p in Path(output_dir).iterdir() if p.name not in PUBLISHABLE_FILES)
    if extra:
        raise RuntimeError(f"{output_dir} holds files that are not known DP outputs: {extra}; "
                           "move them out before publishing")


def base_model_license(base_model: str) -> str | None:
    """The license in the base model's own card (a local folder's README.md, or the Hub card when the Hub
    is reachable); None when it cannot be read."""
    local = Path(base_model).expanduser() / "README.md"
    try:
        return ModelCard.load(local if local.is_file() else base_model).data.license
    except (OSError, ValueError, HfHubHTTPError):  # offline, no card, no such repo
        return None


def card_metadata(base_model: str, class_prompts: list[str], license: str | None,
                  dataset_id: str | None) -> ModelCardData:
    """The card's YAML: what the Hub validates (base_model only for a Hub id, never a local path)."""
    hub_base = hub_model_id(base_model)
    return ModelCardData(
        base_model=hub_base, base_model_relation="adapter" if hub_base else None, library_name="diffusers",
        pipeline_tag="text-to-image", license=license or "other", datasets=[dataset_id] if dataset_id else None,
        tags=["text-to-image", "diffusers", "lora", "differential-privacy", "dp-sapf", "peft-dp-saliency"],
        widget=[{"text": class_prompts[0], "output": {"url": "samples.png"}}], inference=False)


def method_text(config: SaliencyLoraConfig) -> str:
    """The card's first paragraph: what was trained and how it was chosen."""
    if config.selection_unit not in SPARSE_UNITS:
        return ("LoRA adapters trained with differential privacy (DP-SAPF: saliency-aware selection of the adapted\n"
                "matrices, then DP-SGD) on a sensitive dataset.")
    return (f"A sparse weight update trained with differential privacy (private sparse selection: the noisy gradient\n"
            f"query picks the top {config.selection_ratio:g} of the candidate matrices' {config.selection_unit}s, "
            "then DP-SGD trains\nonly those entries of the frozen weights) on a sensitive dataset. It is stored "
            "as an exact full-rank\nLoRA (A = identity, B = the update, zero outside the mask), so "
            "`load_lora_weights` applies it;\nthe mask is in `selection.json`.")


def update_text(config: SaliencyLoraConfig) -> str:
    """The card's line on the trained parameters: LoRA rank, or the sparse mask's size."""
    if config.selection_unit not in SPARSE_UNITS:
        return f"LoRA rank {config.r}, alpha {config.lora_alpha}."
    mask = config.selection_result["mask"]
    return (f"Trained entries: {mask['trainable_parameters']:,} of the pool's {mask['pool_parameters']:,} "
            f"(per matrix in parentheses above).")


def model_card(base_model: str, dataset_description: str, report: PrivacyReport,
               config: SaliencyLoraConfig, selection_table: str, class_prompts: list[str],
               repo_id: str | None, adapter: str = "lora", license: str | None = None,
               dataset_id: str | None = None, pipeline_class: str = "StableDiffusionPipeline",
               guidance_scale: float = 4.0) -> ModelCard:
    """The Hub model card: base model, data, the guarantee in words and numbers, how to load, limits.

    guidance_scale: the classifier-free guidance scale samples.png was drawn at (1 = none); the loading
    code samples at it too.

    license: the adapter's license; default the base model's card license (an adapter of someone else's
    weights inherits their terms), "other" when unknown. dataset_id: a Hub dataset name, if the data is one.
    """
    license = license or base_model_license(base_model)
    base_name = hub_model_id(base_model) or LOCAL_BASE.format(local_base_name(base_model))
    load_base = hub_model_id(base_model) or "path/to/the/base/model"
    others = ", ".join(f"{name.upper()} gives epsilon {value:.3g}" for name, value in report.epsilon.items()
                       if name != report.accountant)
    guarantee = (f"({report.guarantee_epsilon:.3g}, {report.delta:.3g})-DP ({report.accountant.upper()} "
                 f"accountant{'; ' + others if others else ''})" if report.private
                 else "**none: this run is NOT private**")
    if report.private and report.guarantee_epsilon > report.target_epsilon:
        guarantee += (f". **Over budget: the target was epsilon {report.target_epsilon:g}; released anyway "
                      "with --allow_over_budget_release**")
    stages = "\n".join(f"| {s['name']} | {s['noise_multiplier']:.4g} | {s['sample_rate']:.4g} | {s['steps']} "
                       f"| {float(s['max_grad_norm']):.3g} |" for s in report.stages)
    load_path = repo_id or "path/to/output_dir"
    load_call = (f'pipe.load_lora_weights("{load_path}")' if adapter == "lora" else
                 f'import peft_dp_saliency\npeft_dp_saliency.load_adapter(pipe, "{load_path}")  # LoDA: not a LoRA')
    metadata = card_metadata(base_model, class_prompts, license, dataset_id)
    text = f"""---
{metadata.to_yaml()}
---
# DP-SAPF adapter for {base_name}

{method_text(config)}

## Privacy guarantee
Guarantee: {guarantee}, under {report.adjacency_definition}.
Everything in this repository (adapter, selection scores, samples, this card) is a post-processing of the
DP mechanisms below, so it carries the same guarantee. Stages composed by the accountant:

| stage | noise multiplier | sample rate | steps | clipping norm |
|---|---|---|---|---|
{stages}

Dataset size N = {report.dataset_size}, delta = {report.delta:.3g}, target epsilon = {report.target_epsilon},
noise source: {report.noise_source}. Full numbers: `privacy_report.json` (recomputable with any accountant).

## Training data
{dataset_description}

Class prompts: {", ".join(repr(p) for p in class_prompts)}. Class names: {report.class_names} (public input,
not derived from the examples).

## Selected matrices ({config.selection_strategy}, pool {config.candidate_pool}, unit {config.selection_unit}, ratio {config.selection_ratio})
{selection_table}

{update_text(config)}

## How to load
```python
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("{load_base}")
{load_call}
image = pipe({class_prompts[0]!r}, guidance_scale={guidance_scale:g}).images[0]
```

## Samples
Drawn at guidance_scale={guidance_scale:g} (1 = no classifier-free guidance).

![samples](samples.png)

## License
{license or "other: the base model's license could not be read when this card was written; check the base model's terms"}
(the adapter is a derivative of the base model's weights and follows its license).

## Limits
DP bounds what the released outputs reveal about any one example; it does not make the data
representative or fair. Synthetic images reflect the biases of the base model and of the data.
Hyperparameters tuned on the sensitive data outside this run are not covered by the guarantee.
"""
    return ModelCard(text)


def prepare_repo(repo_id: str, token: str | None = None, private: bool = True) -> str:
    """Create (or find) the Hub repo, so a bad token or name fails before any privacy is spent."""
    return create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id


def push_output_dir(output_dir: Path, repo_id: str, token: str | None = None, private: bool = True) -> str:
    """Upload exactly output_dir (after the allow-list check) to the (prepared) Hub repo."""
    check_publishable(output_dir)
    repo_id = prepare_repo(repo_id, token, private)
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=token,
                  commit_message="DP-SAPF adapter, privacy report and model card")
    return repo_id

