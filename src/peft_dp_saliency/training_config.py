"""TrainingConfig: every option of a DP-SAPF run, the single source of the command-line flags.

    config = TrainingConfig(target_epsilon=8, max_train_steps=100)   # from Python
    config = parse_args(["--target_epsilon", "8"])                   # from a command line

Each field carries ``metadata={"help": ...}`` (and ``choices`` where the values are fixed), as PEFT's
LoraConfig does; transformers' ``HfArgumentParser`` turns the fields into argparse flags with the same
names, defaults, choices and ``nargs`` as diffusers' training scripts. A boolean field is a switch
(``--use_ema``); a list field takes several values (``--class_names A B``).

The selection fields are SaliencyLoraConfig's (their help is read from it); the ``select`` CLI parses
a subset of these fields (:func:`arguments_subset`), so no flag is defined twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from . import accounting
from .candidates import POOLS, UNITS
from .config import SCORES, STRATEGIES, SaliencyLoraConfig
from .per_sample import CLIPPING
from .public_model import EMBEDDED_MODEL_PATH

# torchvision's InterpolationMode names (diffusers' --image_interpolation_mode choices), done with PIL.
INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _option(default, help: str, **metadata):
    """A field with its help (and argparse extras such as choices); lists get a copied default."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _selection_option(name: str, default, help: str | None = None, **metadata):
    """A SaliencyLoraConfig field as a flag: its help unless the command line means something else."""
    lora_field = {f.name: f for f in dataclasses.fields(SaliencyLoraConfig)}[name]
    return _option(default, help or lora_field.metadata["help"], **metadata)


@dataclass
class TrainingConfig:
    """One DP-SAPF run: model and data, training, differential privacy, selection, release."""

    # --- model and data (names as in diffusers' train_text_to_image_lora.py) ----------------------
    pretrained_model_name_or_path: str = _option(
        str(EMBEDDED_MODEL_PATH), "The public base model: a diffusers folder or Hub id (SD 1.x/2.x, SDXL, SD3, "
        "Flux, Sana). Default: the embedded tiny Stable-Diffusion model.")
    revision: Optional[str] = _option(None, "Revision (branch, tag or commit) of the base model on the Hub.")
    variant: Optional[str] = _option(None, "Variant of the base model's weight files, e.g. fp16.")
    cache_dir: Optional[str] = _option(
        None, "Where downloaded models and datasets are cached (the Hub default when unset). A cache holds "
        "public downloads only; the encoded sensitive data stays in memory.")
    dataset_name: Optional[str] = _option(
        None, "A datasets Hub name or a saved dataset folder; default: Debian's Fashion-MNIST.")
    dataset_config_name: Optional[str] = _option(
        None, "The config of --dataset_name (datasets.load_dataset's second argument); leave unset if it has one.")
    train_data_dir: Optional[str] = _option(None, "An imagefolder (one subfolder per class).")
    image_column: str = _option("image", "The column of a datasets source that holds the images.")
    label_column: str = _option(
        "label", "The column of a datasets source that holds the class labels (optional with --caption_column).")
    caption_column: Optional[str] = _option(
        None, "Train on each example's own caption (a text column of a datasets source) instead of its class "
        "prompt. DP-safe: a caption is part of its example, it only enters that example's clipped loss and is "
        "never released (no class_prompts of captions, no grid of them): sample grids use --validation_prompt, "
        "which this flag requires, and synthesis takes prompts from a file you choose.")
    prompt_template: str = _option("An image of a {}", "Class prompt: this template filled with the class name.")
    class_names: Optional[list[str]] = _option(
        None, "The public class list, in label order (required when the label column is not a datasets.ClassLabel: "
        "class names are released, so they must never be read off the data).", nargs="+")
    class_prompts: Optional[list[str]] = _option(
        None, "One prompt per class (overrides --prompt_template).", nargs="+")
    max_train_samples: Optional[int] = _option(
        None, "Use the first K examples only (N = K in the privacy analysis).")
    resolution: Optional[int] = _option(None, "Training image side in pixels. Default: the VAE's sample_size.")
    center_crop: bool = _option(
        True, "Images are resized (shorter side) and center-cropped once, before the latent cache; always on "
        "(accepted for diffusers compatibility). --no_center_crop (random crops) is not offered: a random crop "
        "would have to be re-encoded each step.")
    random_flip: bool = _option(
        False, "Horizontally flip each example with probability 1/2 at each DP-SGD step: the latent cache holds "
        "both orientations of every image and the choice is drawn per example per step from the secret "
        "generator, so it acts on that example only (as its timestep and noise do). The selection query uses "
        "the unflipped images.")
    proportion_empty_prompts: float = _option(
        0.0, "Proportion of image prompts to be replaced with empty strings (diffusers' --proportion_empty_prompts): "
        "each example's prompt is \"\" with this probability at each DP-SGD step, so the unconditional prediction "
        "that classifier-free guidance subtracts at synthesis is trained on the data too. The choice is drawn per "
        "example per step from the secret generator (like its timestep); the selection query keeps the prompts.")
    image_interpolation_mode: str = _option(
        "bilinear", "Resampling filter of the resize (PIL). Default bilinear (diffusers: lanczos).",
        choices=INTERPOLATION_MODES)
    max_sequence_length: Optional[int] = _option(
        None, "SD3 / Flux / Sana: text tokens of the T5/Gemma prompt encoder (default: the family's).")
    dataloader_num_workers: int = _option(
        0, "Worker processes that decode images for the one-off encoding pass (images -> latent cache). DP-SGD "
        "steps read the cache and need no loader. 0: decode in the main process.")

    # --- training ---------------------------------------------------------------------------------
    output_dir: str = _option("dp-sapf-model", "The release folder (adapter, privacy report, samples, card).")
    checkpoint_dir: Optional[str] = _option(
        None, "Checkpoints, spending ledger and local logs (not published). Default: <output_dir>-work.")
    overwrite_output_dir: bool = _option(False, "Delete and replace the contents of non-empty output folders.")
    rank: int = _option(4, "LoRA rank r.")
    lora_alpha: Optional[float] = _option(None, "LoRA alpha (the update is scaled by alpha / r). Default: rank.")
    no_lora: bool = _option(False, "DP-SGD directly on the selected matrices.")
    adapter: str = _option(
        "lora", "lora; or LoDA / LoDA+ (W x + B f(A x), f a small residual non-linear map on r dims, Lowy et al.): "
        "released as loda_adapter.safetensors, loaded with peft_dp_saliency.load_adapter(pipe, dir).",
        choices=["lora", "loda", "loda_plus"])
    learning_rate: float = _option(
        5e-3, "AdamW learning rate. The default was chosen for the embedded model on a validation split carved from "
        "the training set (docs/results.md: downstream accuracy 0.598 at 5e-3, 0.593 at 1e-2, 0.513 at 2e-3); large "
        "public models usually want less (1e-4 to 1e-3).")
    lr_scheduler: str = _option("constant", "diffusers' get_scheduler name (constant, linear, cosine, ...).")
    lr_warmup_steps: int = _option(0, "Warm-up steps of the learning-rate schedule.")
    adam_beta1: float = _option(0.9, "AdamW beta1.")
    adam_beta2: float = _option(0.999, "AdamW beta2.")
    adam_weight_decay: float = _option(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _option(1e-8, "AdamW epsilon.")
    max_train_steps: int = _option(200, "DP-SGD steps (each a Poisson-sampled logical batch).")
    train_batch_size: int = _option(64, "Micro-batch (memory only).")
    mixed_precision: Optional[str] = _option(
        None, "fp16 / bf16 autocast with fp32 trainable weights and fp32 clipping and noise (as diffusers).",
        choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = _option(
        False, "Recompute the denoiser's activations in the backward pass (diffusers' "
        "enable_gradient_checkpointing) to save memory. The per-sample hooks record each adapted matrix's "
        "input once, in the forward, and ignore the recomputation, so per-sample gradients are unchanged.")
    allow_tf32: bool = _option(
        False, "Allow TF32 matmuls on Ampere+ GPUs (faster, lower precision; no effect on CPU). Numerics only: "
        "clipping bounds every example's contribution whatever the precision.")
    enable_xformers_memory_efficient_attention: bool = _option(
        False, "xformers attention in the denoiser (memory). Changes how attention is computed, not which "
        "matrices are adapted or how examples are clipped. Fails before anything is spent if xformers is absent.")
    checkpointing_steps: int = _option(50, "Save a resumable checkpoint every this many DP-SGD steps.")
    checkpoints_total_limit: int = _option(
        2, "Keep at most this many checkpoints in the work folder (diffusers: unlimited by default).")
    resume_from_checkpoint: Optional[str] = _option(None, "'latest' or a checkpoint folder.")
    seed: Optional[int] = _option(
        None, "Seeds what is data-independent (LoRA init, random selection, sample grids). Never the mechanisms' "
        "randomness (DP noise, Poisson sampling, timesteps and diffusion noise of each example), which is "
        "secret (os.urandom), unless --deterministic_noise.")
    snr_gamma: Optional[float] = _option(
        None, "Min-SNR weighting (Hang et al. 2023, diffusers' compute_snr): each example's loss is weighted by "
        "min(SNR(t), gamma) / SNR(t) (epsilon) or / (SNR(t) + 1) (v_prediction), t its own timestep. DP-safe: the "
        "weight depends on that example's timestep only (no batch statistic). UNet families (SD, SDXL).")
    noise_offset: float = _option(
        0.0, "Add noise_offset x N(0, 1) per example and channel to the diffusion noise (diffusers' "
        "--noise_offset). DP-safe: drawn from the secret generator for each example, like the noise itself. "
        "UNet families.")
    prediction_type: Optional[str] = _option(
        None, "Training target: epsilon or v_prediction (sets the noise scheduler's prediction_type). Default: "
        "the scheduler's own. A per-example target; UNet families.", choices=PREDICTION_TYPES)
    report_to: Optional[str] = _option(
        None, "accelerate trackers (tensorboard, wandb). They receive only public or DP values: the "
        "hyperparameters (no token, no local path), the learning rate, the steps spent and samples. The "
        "un-noised training loss goes to <output_dir>-work/train_loss.csv only.")
    report_nonprivate_training_loss: bool = _option(
        False, "ALSO send the un-noised training loss (computed on the sensitive data, NOT covered by the DP "
        "guarantee) to the --report_to trackers. Off by default.")
    validation_prompt: Optional[str] = _option(None, "Prompt of the sample grids. Default: the class prompts.")
    num_validation_images: int = _option(8, "Images per prompt in each sample grid.")
    validation_guidance_scale: float = _option(
        4.0, "Classifier-free guidance scale of the sample grids (1 = none). Give the scale you will synthesize "
        "at (scripts/run.sh does) so that samples.png shows what the synthetic set holds; the card's loading "
        "code uses it too.")
    validation_epochs: Optional[int] = _option(
        None, "Also draw a sample grid every this many epochs (an epoch = round(1 / q) DP-SGD steps), saved to "
        "<output_dir>-work/validation/ and sent to the --report_to trackers. DP-safe: the grid is computed from "
        "the DP iterate alone (post-processing). Default: only the released grid at the end.")
    push_to_hub: bool = _option(False, "Push the release to the Hub (the repo and token are checked first).")
    hub_model_id: Optional[str] = _option(None, "The Hub repository of --push_to_hub.")
    hub_token: Optional[str] = _option(None, "Hub token (prefer `hf auth login`).")
    hub_private: bool = _option(False, "Create the Hub repository as private.")
    license: Optional[str] = _option(
        None, "License of the released adapter. Default: the base model's card license (SD-1.5: "
        "creativeml-openrail-m), 'other' when it cannot be read.")

    # --- differential privacy ---------------------------------------------------------------------
    target_epsilon: float = _option(10.0, "The whole run's budget (selection + DP-SGD); 'inf' trains without privacy.")
    target_delta: Optional[float] = _option(None, "Default: 1/(N ln N).")
    max_grad_norm: float = _option(
        1.0, "C: the per-example clipping norm (not diffusers' global gradient-norm clip). With --clipping "
        "automatic every example contributes C g/(||g|| + 0.01), so C only scales.")
    clipping: str = _option(
        "automatic", "automatic: per-example normalisation (Bu et al. 2023), no C to tune; flat: min(1, C/||g||) "
        "(Abadi et al. 2016), which needs C matched to the gradients (never chosen from un-noised norms of the "
        "sensitive data: that is a release). Both have sensitivity C.", choices=list(CLIPPING))
    noise_multiplicity: int = _option(
        1, "K (timestep, noise) draws averaged per example before clipping (DPDM): free in privacy, K x compute "
        "and memory per micro-batch.")
    use_ema: bool = _option(
        False, "Release the exponential moving average of the DP iterates (post-processing: free).")
    ema_decay: float = _option(0.999, "Decay of --use_ema.")
    expected_batch_size: int = _option(512, "Logical batch: q = this / N.")
    accountant: str = _option("pld", "The accountant that calibrates sigma and reports epsilon.",
                              choices=list(accounting.ACCOUNTANTS))
    adjacency: str = _option(
        accounting.DEFAULT_ADJACENCY, "zero_out: one example replaced by a null example, N public (what dividing "
        "by the fixed N proves); replace_one: one example replaced by another (sensitivity 2C; PLD only).",
        choices=sorted(accounting.ADJACENCIES))
    allow_over_budget_release: bool = _option(
        False, "Release even if the spent epsilon exceeds --target_epsilon (the model card says so). Without it "
        "such a run stops before spending more and releases nothing.")
    deterministic_noise: bool = _option(
        False, "Tests only: seed every mechanism's randomness from --seed. NOT private.")
    selection_json: Optional[str] = _option(
        None, "Reuse a saliency query paid for earlier (`python -m peft_dp_saliency.select` output or a release's "
        "selection.json) instead of running one: --selection_ratio re-ranks its noisy scores (post-processing) "
        "and this run's report still counts the query.")

    # --- saliency selection (SaliencyLoraConfig fields) -------------------------------------------
    selection_strategy: str = _selection_option("selection_strategy", "saliency", choices=list(STRATEGIES))
    candidate_pool: str = _selection_option("candidate_pool", "attn_qkv", choices=list(POOLS))
    selection_unit: str = _selection_option("selection_unit", "matrix", choices=list(UNITS))
    selection_ratio: float = _selection_option("selection_ratio", 0.3)
    saliency_score: str = _selection_option("saliency_score", "norm", choices=list(SCORES))
    selection_noise_multiplier: Optional[float] = _selection_option(
        "selection_noise_multiplier", None, "sigma_s: the query's noise std is sigma_s C / N. Default: calibrated "
        "from --selection_budget_fraction.")
    selection_budget_fraction: float = _option(
        0.1, "Without --selection_noise_multiplier: sigma_s is the smallest noise whose query alone costs at most "
        "this fraction of --target_epsilon (under both accountants).")
    selection_max_grad_norm: float = _selection_option("selection_max_grad_norm", 1.0)
    selection_sample_rate: float = _selection_option(
        "selection_sample_rate", 0.1, "The query runs on a Poisson subsample of this rate (amplification "
        "accounted; 1 = all N).")
    selection_clipping: str = _selection_option("selection_clipping", "automatic", choices=list(CLIPPING))
    selection_noise_multiplicity: int = _selection_option("selection_noise_multiplicity", 1)
    selection_batch_size: int = _option(64, "Micro-batch of the selection query and of the encoding pass (memory only).")


# The SaliencyLoraConfig-side fields (the `select` command takes these too).
SELECTION_FLAGS = ["selection_strategy", "candidate_pool", "selection_unit", "selection_ratio", "saliency_score",
                   "selection_noise_multiplier", "selection_budget_fraction", "selection_max_grad_norm",
                   "selection_sample_rate", "selection_clipping", "selection_noise_multiplicity",
                   "selection_batch_size"]


# --help lists TrainingConfig's flags under these headings: each section runs from its first field (in
# TrainingConfig's order) to the next section's.
HELP_SECTIONS = {"model and data": "pretrained_model_name_or_path", "training": "output_dir",
                 "differential privacy": "target_epsilon", "saliency selection": "selection_strategy"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and the module docstring as written."""


def help_section(name: str) -> str | None:
    """The HELP_SECTIONS heading of a TrainingConfig field (None for a flag TrainingConfig does not have)."""
    order = [f.name for f in dataclasses.fields(TrainingConfig)]
    if name not in order:
        return None
    starts = sorted((order.index(first), title) for title, first in HELP_SECTIONS.items())
    return [title for start, title in starts if start <= order.index(name)][-1]


def parser(config_class: type = TrainingConfig, **kwargs) -> HfArgumentParser:
    """The argparse parser of a config dataclass (kwargs: ArgumentParser's, e.g. description), its flags
    grouped by HELP_SECTIONS in --help (a command's own flags stay under "options")."""
    p = HfArgumentParser(config_class, **{"formatter_class": _HelpFormatter, **kwargs})
    # HfArgumentParser puts a dataclass's fields in one group and argparse cannot move an action between
    # groups through its public API; the group's action list is what add_argument_group would have filled.
    options, groups = p._action_groups[1], {}
    for action in list(options._group_actions):
        title = help_section(action.dest)
        if title is not None:
            group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
            group._group_actions.append(action)
            options._group_actions.remove(action)
    return p


def parse_args(argv=None, config_class: type = TrainingConfig, **kwargs):
    """A `config_class` instance from command-line flags (argv None: sys.argv[1:]); unknown flags exit."""
    p = parser(config_class, **kwargs)
    return config_class(**vars(p.parse_args(argv)))


def arguments_subset(name: str, names: list[str], extra: tuple = ()) -> type:
    """A dataclass with TrainingConfig's fields `names` (same defaults and help) plus `extra`
    ((name, type, field) triples, e.g. a CLI's own output flag), for a command that takes only some."""
    own = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    hints = typing.get_type_hints(TrainingConfig)  # resolved types: the new class lives in no module
    copied = [(n, hints[n], field(default=own[n].default, default_factory=own[n].default_factory,
                                  metadata=own[n].metadata)) for n in names]
    return dataclasses.make_dataclass(name, [*extra, *copied])
