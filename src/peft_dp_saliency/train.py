#!/usr/bin/env python
"""DP-SAPF: differentially private saliency-aware LoRA fine-tuning of a text-to-image model.

    accelerate launch examples/train_dp_sapf.py --target_epsilon 10 --output_dir dp-sapf-fmnist
    python -m peft_dp_saliency.train --help

With no flags it adapts the embedded public model to Fashion-MNIST (Debian's dataset-fashion-mnist).
Stages: (1) private saliency query over all candidate matrices -> target_modules, (2) LoRA on those
matrices trained with DP-SGD (Poisson sampling, per-sample clipping, noise once per step),
(3) one accountant for both, (4) release: adapter, privacy report, samples, model card [, Hub push].

Baselines by flags: --selection_strategy all (DP-LoRA), random, --selection_unit layer,
--candidate_pool attn_qkvo, --no_lora (DP-SGD on the selected matrices), --target_epsilon inf.
Private sparse selection: --selection_unit entry / row (DP-SGD on the masked entries only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from tqdm.auto import tqdm

from peft_dp_saliency import accounting, hub, training_config
from peft_dp_saliency.candidates import SPARSE_UNITS
from peft_dp_saliency.data import load_sensitive_dataset
from peft_dp_saliency.families import SUPPORTED_PIPELINES, ModelFamily, detect_family
from peft_dp_saliency.loda import add_loda_adapters, load_adapter, save_loda
from peft_dp_saliency.dp_sgd import (DPSGDSettings, DPSGDStep, broadcast_trainable, check_no_dropout,
                                    poisson_sampler)
from peft_dp_saliency.noise import noise_generator
from peft_dp_saliency.run_state import RunState
from peft_dp_saliency.sampling import prompt_grid
from peft_dp_saliency.sharding import encode_shard
from peft_dp_saliency.select import config_from_args
from peft_dp_saliency.selection import SelectionResult, load_paid_selection, reselect, select_target_modules
from peft_dp_saliency.sparse import add_masked_deltas, masked_updates
from peft_dp_saliency.training_config import TrainingConfig

logger = logging.getLogger("train_dp_sapf")


def parse_args(argv=None) -> TrainingConfig:
    """The run's TrainingConfig from command-line flags (its fields are the flags)."""
    return training_config.parse_args(argv, description=__doc__)


def check_args(args) -> None:
    """Errors that need no data: raised before anything is read or written."""
    problems = []
    if math.isnan(args.target_epsilon) or args.target_epsilon <= 0:
        problems.append(f"--target_epsilon must be > 0 (or inf for non-private), got {args.target_epsilon}")
    if args.target_delta is not None and not 0 < args.target_delta < 1:
        problems.append(f"--target_delta must be in (0, 1) (and < 1/N), got {args.target_delta}")
    if not 0 < args.selection_ratio <= 1:
        problems.append(f"--selection_ratio must be in (0, 1], got {args.selection_ratio}")
    for flag in ("max_grad_norm", "expected_batch_size", "train_batch_size", "max_train_steps", "rank",
                 "learning_rate", "selection_batch_size", "selection_max_grad_norm", "checkpointing_steps",
                 "num_validation_images", "validation_guidance_scale", "noise_multiplicity",
                 "selection_noise_multiplicity"):
        if not getattr(args, flag) > 0:
            problems.append(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.selection_noise_multiplier is not None and not args.selection_noise_multiplier > 0:
        problems.append(f"--selection_noise_multiplier must be > 0, got {args.selection_noise_multiplier}")
    if not 0 < args.selection_sample_rate <= 1:
        problems.append(f"--selection_sample_rate must be in (0, 1], got {args.selection_sample_rate}")
    if not 0 < args.selection_budget_fraction < 1:
        problems.append(f"--selection_budget_fraction must be in (0, 1), got {args.selection_budget_fraction}")
    if not 0 < args.ema_decay < 1:
        problems.append(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if args.max_train_samples is not None and args.max_train_samples < 2:
        problems.append(f"--max_train_samples must be >= 2, got {args.max_train_samples}")
    if args.no_lora and args.adapter != "lora":
        problems.append("--no_lora trains the selected matrices themselves: it takes no --adapter")
    if args.selection_unit in SPARSE_UNITS and args.adapter != "lora":
        problems.append(f"--selection_unit {args.selection_unit} trains the masked entries themselves: "
                        "it takes no --adapter")
    if args.candidate_pool == "all_linear_conv" and (args.selection_unit in SPARSE_UNITS or args.adapter != "lora"):
        problems.append("--candidate_pool all_linear_conv holds convolutions, which only LoRA (or --no_lora) "
                        f"adapts: use --candidate_pool all_linear for --selection_unit {args.selection_unit} / "
                        f"--adapter {args.adapter}")
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id")
    if args.report_to and "wandb" in args.report_to and args.hub_token is not None:
        problems.append("--report_to wandb and --hub_token cannot be used together (the token could be "
                        "exposed): authenticate with `hf auth login` instead")
    if args.deterministic_noise and args.seed is None:
        problems.append("--deterministic_noise needs --seed")
    if args.adjacency == "replace_one" and args.accountant != "pld" and math.isfinite(args.target_epsilon):
        problems.append("--adjacency replace_one needs --accountant pld (the RDP accountant here has no "
                        "replace-one analysis of Poisson sampling)")
    if args.dataset_name and args.train_data_dir:
        problems.append("give either --dataset_name or --train_data_dir, not both")
    problems += _check_diffusers_flags(args)
    if problems:
        raise SystemExit("invalid arguments: " + "\n  ".join(problems))


def _check_diffusers_flags(args) -> list[str]:
    """Problems with the flags taken from diffusers' scripts (found before anything is read)."""
    problems = []
    if not args.center_crop:
        problems.append("--no_center_crop (random crops) is not offered: images are cropped once, before the "
                        "latent cache; a random crop per step would re-encode every image each step")
    if args.caption_column and not args.validation_prompt:
        problems.append("--caption_column needs --validation_prompt: captions are data, so the sample grids "
                        "(released) cannot use them; give a public prompt")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            problems.append("--enable_xformers_memory_efficient_attention: xformers is not installed "
                            "(pip install xformers), or drop the flag")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        problems.append(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    for flag in ("noise_offset", "dataloader_num_workers"):
        if not getattr(args, flag) >= 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not 0 <= args.proportion_empty_prompts <= 1:
        problems.append(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    for flag in ("checkpoints_total_limit", "validation_epochs"):
        if getattr(args, flag) is not None and not getattr(args, flag) >= 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return problems


def loss_options(args) -> dict:
    """The per-example loss options given on the command line (family constructor arguments)."""
    given = {"snr_gamma": args.snr_gamma, "noise_offset": args.noise_offset or None,
             "prediction_type": args.prediction_type}
    return {name: value for name, value in given.items() if value is not None}


def model_family(source, args) -> ModelFamily:
    """The model family of a loaded pipeline or of --pretrained_model_name_or_path (from its
    model_index.json), with the run's loss options, checked before anything is read: a local folder
    must hold that family's files; an unsupported pipeline or loss option exits."""
    family = _model_family(source, args.revision, args.cache_dir) if isinstance(source, str) else None
    with input_errors("the pipeline"):
        family = family or detect_family(source)
    options = loss_options(args)
    unsupported = sorted(set(options) - set(family.loss_options))
    if unsupported:
        raise SystemExit(f"{', '.join('--' + o for o in unsupported)}: DDPM (UNet) options only, not for "
                         f"{family.pipeline_class_name} (flow matching has its own target and weighting)")
    return type(family)(**options) if options else family


def _model_family(path: str, revision: str | None = None, cache_dir: str | None = None) -> ModelFamily:
    """The family of a model folder / Hub id, its folder checked for that family's files."""
    folder = Path(path).expanduser()
    if not folder.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise SystemExit(f"--pretrained_model_name_or_path {path} does not exist (and is not a Hub model id)")
    if folder.exists() and not (folder / "model_index.json").is_file():
        raise SystemExit(f"--pretrained_model_name_or_path {path} is not a diffusers Stable Diffusion folder "
                         "(missing model_index.json): pass a folder saved with <Pipeline>.save_pretrained "
                         f"(supported: {', '.join(SUPPORTED_PIPELINES)}) or a Hub model id")
    with input_errors(f"cannot load the model {path}"):
        family = detect_family(path, revision=revision, cache_dir=cache_dir)
    missing = family.missing_files(folder) if folder.exists() else []
    if missing:
        raise SystemExit(f"--pretrained_model_name_or_path {path} is not a diffusers {family.pipeline_class_name} "
                         f"folder (missing {', '.join(missing)}): pass a folder saved with "
                         f"{family.pipeline_class_name}.save_pretrained or a Hub model id")
    return family


@contextmanager
def input_errors(what: str):
    """Turn the library's input errors during setup (before any spending) into a one-line exit."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise SystemExit(f"{what}: {error}") from error


def plan_inputs(args, dataset) -> dict:
    """Everything the privacy plan depends on; a resumed run must match it field by field."""
    n = len(dataset)
    if args.expected_batch_size > n:
        raise SystemExit(f"--expected_batch_size {args.expected_batch_size} exceeds the dataset size {n}: "
                         "lower it (the sampling rate q = batch / N must be <= 1)")
    delta = args.target_delta if args.target_delta is not None else accounting.default_delta(n)
    with input_errors("--target_delta"):
        accounting.check_delta(delta, n)
    return {"dataset_size": n, "dataset_fingerprint": dataset.fingerprint(), "target_epsilon": args.target_epsilon,
            "delta": delta, "accountant": args.accountant, "adjacency": args.adjacency,
            "max_train_steps": args.max_train_steps, "expected_batch_size": args.expected_batch_size,
            "max_grad_norm": args.max_grad_norm, "clipping": args.clipping,
            "noise_multiplicity": args.noise_multiplicity, "selection_strategy": args.selection_strategy,
            "selection_noise_multiplier": args.selection_noise_multiplier,
            "selection_budget_fraction": args.selection_budget_fraction,
            "selection_max_grad_norm": args.selection_max_grad_norm, "selection_clipping": args.selection_clipping,
            "selection_noise_multiplicity": args.selection_noise_multiplicity,
            "selection_sample_rate": args.selection_sample_rate,
            # a resume must not change where the mechanisms' randomness came from: the steps and query already
            # spent with seeded noise stay seeded, whatever the resuming command says
            "deterministic_noise": args.deterministic_noise}


def adopt_paid_selection(args, n: int) -> SelectionResult:
    """Load --selection_json and make the run's selection flags describe that query (it is counted)."""
    with input_errors(f"--selection_json {args.selection_json}"):
        paid = load_paid_selection(args.selection_json)
    mechanism = paid.mechanism
    mismatched = [f"{what}: query {theirs!r}, run {ours!r}" for what, theirs, ours in (
        ("dataset size", mechanism["dataset_size"], n), ("--candidate_pool", paid.pool, args.candidate_pool),
        ("--selection_unit", paid.unit, args.selection_unit), ("--saliency_score", paid.score, args.saliency_score))
        if theirs != ours]
    if mismatched or args.selection_strategy != "saliency":
        raise SystemExit(f"--selection_json {args.selection_json} does not fit this run ("
                         + "; ".join(mismatched or ["--selection_strategy must be saliency"]) + ")")
    args.selection_noise_multiplier = float(mechanism["noise_multiplier"])
    args.selection_max_grad_norm = float(mechanism["max_grad_norm"])
    args.selection_sample_rate = float(mechanism["sample_rate"])
    return paid


def check_resumed_selection(selection: SelectionResult | None, args) -> None:
    """A resumed run keeps the selection it made (and may have paid for): refuse selection flags that describe
    another one, which the card, report and selection.json would otherwise print over the matrices trained."""
    if selection is None:
        return
    flags = [("--selection_strategy", selection.strategy, args.selection_strategy),
             ("--candidate_pool", selection.pool, args.candidate_pool),
             ("--selection_unit", selection.unit, args.selection_unit)]
    if selection.strategy != "all":  # DP-LoRA takes every candidate whatever the ratio
        flags.append(("--selection_ratio", selection.ratio, args.selection_ratio))
    if selection.strategy == "saliency":
        flags.append(("--saliency_score", selection.score, args.saliency_score))
    mismatched = [f"{flag} {was!r} (this command: {now!r})" for flag, was, now in flags if was != now]
    if mismatched:
        raise SystemExit("--resume_from_checkpoint: this run selected its matrices with " + "; ".join(mismatched)
                         + ". Resume with those flags, or start a fresh --output_dir (what this run spent stays "
                         "in its report)")


def calibrate_plan(inputs: dict) -> dict:
    """Sampling rate, calibrated sigma and effective clipping norm (inf: non-private, no clipping).

    Fails (BudgetCannotBeMetError -> exit) before any data is touched.
    """
    private = math.isfinite(inputs["target_epsilon"])
    sigma_s = inputs["selection_noise_multiplier"]
    if sigma_s is None:  # the query takes at most its fraction of the budget (a public choice)
        with input_errors("--selection_budget_fraction"):
            sigma_s = accounting.selection_noise_for_budget(
                inputs["selection_budget_fraction"] * inputs["target_epsilon"], inputs["delta"],
                inputs["adjacency"], inputs["dataset_size"], inputs["selection_sample_rate"]) if private else 1.0
    calibrated = {"selection_sigma": sigma_s, "sample_rate": inputs["expected_batch_size"] / inputs["dataset_size"],
                  "effective_max_grad_norm": inputs["max_grad_norm"] if private else math.inf}
    sigma = dp_sgd_noise({**inputs, **calibrated}, planned_spending({**inputs, **calibrated}),
                         inputs["max_train_steps"]) if private else 0.0
    return {**calibrated, "noise_multiplier": sigma}


def planned_spending(plan: dict) -> list:
    """The stages a run spends before DP-SGD: the selection query, if the strategy reads the data."""
    if plan["selection_strategy"] != "saliency":
        return []
    return [accounting.selection_stage(plan["selection_sigma"], plan["selection_max_grad_norm"],
                                       plan["selection_sample_rate"])]


def dp_sgd_noise(plan: dict, spent: list, steps: int) -> float:
    """The smallest DP-SGD noise multiplier for `steps` more steps after the `spent` stages."""
    with input_errors("--target_epsilon"):
        return accounting.calibrate_noise_multiplier(
            plan["target_epsilon"], plan["delta"], plan["expected_batch_size"] / plan["dataset_size"], steps,
            fixed_stages=spent, accountant=plan["accountant"], dataset_size=plan["dataset_size"],
            adjacency=plan["adjacency"])


def noise_for_remaining_steps(plan: dict, spent: list, steps: int, allow_over_budget: bool) -> float:
    """The noise multiplier for the next `steps` DP-SGD steps, given what the ledger already holds.

    The plan's sigma, unless spending beyond the plan (a selection query or DP-SGD steps that ran
    again after a crash) would push epsilon over the target: then sigma is raised so the total
    still meets it (spend less, never more). If no sigma can, the run stops before spending more,
    unless `allow_over_budget` (the release then states the overspend).
    """
    sigma = plan["noise_multiplier"]
    if not math.isfinite(plan["target_epsilon"]) or steps == 0:
        return sigma
    stages = spent + [accounting.dp_sgd_stage(sigma, plan["sample_rate"], steps, 1.0)]
    if accounting.compute_epsilon(stages, plan["delta"], plan["accountant"],
                                  adjacency=plan["adjacency"]) <= plan["target_epsilon"]:
        return sigma
    try:
        raised = accounting.calibrate_noise_multiplier(
            plan["target_epsilon"], plan["delta"], plan["sample_rate"], steps, fixed_stages=spent,
            accountant=plan["accountant"], adjacency=plan["adjacency"])
    except accounting.BudgetCannotBeMetError as error:
        if allow_over_budget:
            logger.warning("over budget (--allow_over_budget_release): %s", error)
            return sigma
        raise SystemExit(f"resuming cannot stay within the privacy budget: {error}. Nothing more was spent "
                         "and nothing is released; --allow_over_budget_release trains and releases anyway "
                         "(the model card then states the overspend)") from None
    logger.warning("the ledger holds spending beyond the plan (runs interrupted after spending): the DP-SGD "
                   "noise multiplier is raised from %.4g to %.4g for the remaining %d steps to stay within "
                   "epsilon %.4g", sigma, raised, steps, plan["target_epsilon"])
    return raised


def make_accelerator(args, work_dir: Path) -> Accelerator:
    """The Accelerator; several processes without a GPU run on CPU with gloo.

    `accelerate launch --multi_gpu --num_processes 2` (or torchrun) on a CPU-only machine starts a
    process group that accelerate does not recognise unless cpu=True, so every process would act
    as the main one; we pass cpu=True there and check that accelerate sees all processes.
    """
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A second run in the same Python process (fit() twice in a notebook, with another --mixed_precision)
    # would otherwise hit accelerate's "AcceleratorState has already been initialized"; the process
    # group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_dir=str(work_dir))
    if dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        raise SystemExit(f"{dist.get_world_size()} processes are running but accelerate sees "
                         f"{accelerator.num_processes}: launch with `accelerate launch --multi_gpu "
                         "--num_processes K` (CPU: gloo) or torchrun")
    return accelerator


@dataclass
class TrainingResult:
    """What a finished run released (all DP outputs): the folder, its privacy report and selection,
    and (from :func:`fit`) the adapted denoiser in memory (the UNet, or the transformer of SD3 / Flux / Sana)."""

    output_dir: Path
    report: accounting.PrivacyReport
    selection: SelectionResult
    unet: torch.nn.Module | None = None

    @classmethod
    def load(cls, output_dir: str | Path) -> "TrainingResult":
        output_dir = Path(output_dir)
        selection = json.loads((output_dir / "selection.json").read_text())
        known = {f.name for f in fields(SelectionResult)}
        return cls(output_dir, accounting.PrivacyReport.load(str(output_dir / "privacy_report.json")),
                   SelectionResult(**{k: v for k, v in selection.items() if k in known}))

    def load_into(self, pipe) -> None:
        """Install the released adapter in `pipe` (LoRA via load_lora_weights, LoDA via load_adapter)."""
        if (self.output_dir / "loda_config.json").exists():
            load_adapter(pipe, self.output_dir)
        else:
            pipe.load_lora_weights(str(self.output_dir))

    def save(self, output_dir: str | Path) -> Path:
        """Copy the release (exactly its allow-listed files) to a new or empty folder; returns it."""
        hub.check_publishable(self.output_dir)
        target = Path(output_dir)
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f"{target} is not empty")
        target.mkdir(parents=True, exist_ok=True)
        for path in self.output_dir.iterdir():
            shutil.copy2(path, target / path.name)
        return target

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False) -> str:
        """Upload exactly the released files (allow-list checked); returns the repo id."""
        return hub.push_output_dir(self.output_dir, repo_id, token=token, private=private)


def fit(model=None, dataset=None, config: TrainingConfig | None = None, **options) -> TrainingResult:
    """The whole run from Python; returns the release with the adapted denoiser.

        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        result = fit(pipe, load_dataset("uoft-cs/cifar10", split="train"), TrainingConfig(target_epsilon=8))
        result.report.epsilon, result.selection.selected, result.unet; result.push_to_hub("me/dp-lora")

    model: a diffusers pipeline object (adapted in place: its denoiser gets the adapter and the
        --mixed_precision dtype) or a model id / folder; None: config.pretrained_model_name_or_path.
    dataset: a ``datasets.Dataset`` (image and label columns as config says), a Hub name or a folder;
        None: config.dataset_name / config.train_data_dir (default Fashion-MNIST).
    config: a TrainingConfig (default: the command line's defaults); options: its fields to override
        (``fit(pipe, ds, output_dir="out", max_train_steps=100)``); an unknown name raises TypeError
        before anything runs.
    """
    unknown = sorted(set(options) - {f.name for f in fields(TrainingConfig)})
    if unknown:
        raise TypeError(f"unknown training options {unknown}; see python -m peft_dp_saliency.train --help")
    config = dataclasses.replace(config or TrainingConfig(), **options)
    config.output_dir = str(config.output_dir)  # a Path is welcome
    pipeline = data = None
    if isinstance(model, (str, Path)):
        config.pretrained_model_name_or_path = str(model)
    else:
        pipeline = model
    if isinstance(dataset, (str, Path)):
        config.dataset_name, config.train_data_dir = str(dataset), None
    else:
        data = dataset
    unet = run(config, pipeline, data)
    result = TrainingResult.load(config.output_dir)
    result.unet = unet
    return result


def main(argv=None) -> None:
    """The command line: flags -> TrainingConfig -> :func:`run`."""
    run(parse_args(argv))


def run(args: TrainingConfig, pipeline=None, dataset=None) -> torch.nn.Module:
    """One run from a config (and optionally an in-memory pipeline and ``datasets.Dataset``); returns
    the adapted denoiser. Input errors exit (SystemExit) before anything is spent."""
    check_args(args)
    family = model_family(pipeline if pipeline is not None else args.pretrained_model_name_or_path, args)
    output_dir = Path(args.output_dir)
    work_dir = Path(args.checkpoint_dir or f"{args.output_dir.rstrip('/')}-work")
    accelerator = make_accelerator(args, work_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = RunState(work_dir, output_dir, resume=args.resume_from_checkpoint,
                     overwrite=args.overwrite_output_dir, is_main=accelerator.is_main_process,
                     keep_checkpoints=args.checkpoints_total_limit)
    # SIGTERM (kill, a launcher stopping its workers) unwinds like an error, so temporary files go.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return train(args, accelerator, state, output_dir, family, pipeline, dataset)
    except BaseException:
        state.discard_if_unspent()  # a failure before any spending leaves no trace
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def train(args, accelerator: Accelerator, state: RunState, output_dir: Path, family: ModelFamily,
          pipeline=None, dataset_object=None) -> torch.nn.Module:
    if args.seed is not None:
        set_seed(args.seed)  # data-independent randomness only (LoRA init, random selection)
    if args.allow_tf32:  # as diffusers: TF32 matmuls on Ampere+ GPUs (numerics only)
        torch.backends.cuda.matmul.allow_tf32 = True

    # Setup: every input error surfaces here, before the ledger records any spending.
    model_source = pipeline if pipeline is not None else args.pretrained_model_name_or_path
    with input_errors(f"cannot load the model {args.pretrained_model_name_or_path}"):
        resolution = args.resolution or family.default_resolution(model_source, args.revision, args.cache_dir)
    with input_errors("unsupported --resolution"):
        family.check_resolution(resolution)
    with input_errors("cannot load the sensitive dataset"):
        dataset = load_sensitive_dataset(
            dataset_object if dataset_object is not None else args.train_data_dir or args.dataset_name,
            resolution=resolution, image_column=args.image_column, label_column=args.label_column,
            prompt_template=args.prompt_template, prompts=args.class_prompts, class_names=args.class_names,
            max_examples=args.max_train_samples, caption_column=args.caption_column,
            interpolation=args.image_interpolation_mode, config_name=args.dataset_config_name,
            cache_dir=args.cache_dir)
    if len(dataset) < 2:
        raise SystemExit(f"the sensitive dataset has {len(dataset)} example(s); DP training needs at least 2")
    paid = adopt_paid_selection(args, len(dataset)) if args.selection_json else None
    if args.push_to_hub and accelerator.is_main_process:  # a bad token or repo name fails before spending
        try:
            hub.prepare_repo(args.hub_model_id, token=args.hub_token, private=args.hub_private)
        except Exception as error:  # any Hub failure here (auth, name, network) must stop the run unspent
            raise SystemExit(f"--push_to_hub: cannot create or access {args.hub_model_id}: {error}. Nothing was "
                             "spent: fix the token (`hf auth login`) or --hub_model_id and rerun") from error
    inputs = plan_inputs(args, dataset)
    plan = broadcast_object_list([state.plan(inputs, lambda: calibrate_plan(inputs))])[0]
    check_resumed_selection(state.selection(), args)
    logger.info("N=%d q=%.4g sigma=%.4g delta=%.3g over %d steps", plan["dataset_size"], plan["sample_rate"],
                plan["noise_multiplier"], plan["delta"], plan["max_train_steps"])

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    with input_errors(f"cannot load the model {args.pretrained_model_name_or_path}"):
        if pipeline is None:
            pipe = family.load_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                                        variant=args.variant, torch_dtype=weight_dtype, cache_dir=args.cache_dir)
        else:  # the caller's pipeline, adapted in place
            pipe = pipeline.to(dtype=weight_dtype)
        noise_scheduler = family.noise_scheduler(model_source, revision=args.revision,
                                                 **({"cache_dir": args.cache_dir} if pipeline is None else {}))
    if args.prediction_type:  # the sample grids sample with the target the adapter was trained for
        pipe.scheduler.register_to_config(prediction_type=args.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    for module in family.frozen_modules(pipe):
        module.requires_grad_(False)
    pipe.to(accelerator.device)  # before adding adapters (opacus#820-style device mismatches)
    unet = family.denoiser(pipe)  # the UNet, or the transformer of SD3 / Flux / Sana
    if getattr(unet, "peft_config", None):
        raise SystemExit(f"the pipeline's {family.denoiser_attr} already has adapters {sorted(unet.peft_config)}: "
                         "pass a freshly loaded pipeline")
    with input_errors("the denoiser's dropout"):
        check_no_dropout(unet)
    with input_errors("--candidate_pool"):
        family.candidates(unet, args.candidate_pool)
    with input_errors("--gradient_checkpointing / --enable_xformers_memory_efficient_attention"):
        if args.gradient_checkpointing:  # non-reentrant: the per-sample hooks skip the recomputation
            unet.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
    with state.timed("encode"):
        sequence = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
        data = encode_shard(family, pipe, dataset, batch_size=args.selection_batch_size,  # this rank's examples
                            show_progress=accelerator.is_local_main_process, resolution=resolution,
                            flip=args.random_flip, num_workers=args.dataloader_num_workers,
                            empty_prompt=args.proportion_empty_prompts > 0, **sequence)
    # --seed is public: it seeds the random strategy (data-independent); the mechanisms' randomness
    # is secret unless --deterministic_noise.
    config = config_from_args(args, args.seed, plan["selection_sigma"], r=args.rank,
                              lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian")
    selection = state.selection()
    if selection is None and paid is not None:
        if {m for members in paid.units.values() for m in members} != set(family.candidates(unet, args.candidate_pool)):
            raise SystemExit(f"--selection_json {args.selection_json}: its matrices are not this model's "
                             f"{args.candidate_pool} candidates (another base model?)")
        state.record_spending("selection", plan["selection_sigma"], plan["selection_sample_rate"],
                              args.selection_max_grad_norm)
        selection = reselect(paid, args.selection_ratio)
        state.save_selection(selection)
    if selection is None:
        if args.selection_strategy == "saliency":  # spend first, then run: never refunded
            noise_for_remaining_steps(plan, _spent(state) + planned_spending(plan), plan["max_train_steps"],
                                      args.allow_over_budget_release)  # exits if a re-run cannot fit
            state.record_spending("selection", plan["selection_sigma"], plan["selection_sample_rate"],
                                  args.selection_max_grad_norm)
        with state.timed("selection"), mixed_precision(accelerator.device, weight_dtype):
            selection = select_target_modules(unet, noise_scheduler, data, config, args.selection_batch_size,
                                              show_progress=accelerator.is_local_main_process, family=family)
        selection = broadcast_object_list([selection])[0]
        state.save_selection(selection)
    config.target_modules = selection.selected
    config.selection_result = selection.to_dict()
    logger.info("selected %d of %d matrices\n%s", len(selection.selected), len(selection.units_flat()),
                selection.table())

    public_weights = {}
    sparse = selection.unit in SPARSE_UNITS
    if sparse:  # only the masked entries train (their `delta` vectors): optimizer state and noise cover them only
        add_masked_deltas(unet, selection.masks())
        logger.info("training %d of the pool's %d entries (%s unit)", selection.mask["trainable_parameters"],
                    selection.mask["pool_parameters"], selection.unit)
    elif args.no_lora:
        for name in selection.selected:
            weight = unet.get_submodule(name).weight
            public_weights[name] = weight.detach().clone()
            weight.requires_grad_(True)
    elif args.adapter == "lora":
        unet.add_adapter(config)
    else:
        add_loda_adapters(unet, selection.selected, args.rank, args.lora_alpha or args.rank, variant=args.adapter,
                          generator=None if args.seed is None else torch.Generator().manual_seed(args.seed))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps)
    ema = EMAModel(params, decay=args.ema_decay) if args.use_ema else None
    start_step = state.load_checkpoint(unet, optimizer, lr_scheduler, ema)
    broadcast_trainable(unet)  # replicas start identical (random LoRA init) and stay so

    remaining = plan["max_train_steps"] - start_step
    sigma = broadcast_object_list([noise_for_remaining_steps(plan, _spent(state), remaining,
                                                             args.allow_over_budget_release)
                                   if accelerator.is_main_process else None])[0]
    settings = DPSGDSettings(noise_multiplier=sigma, max_grad_norm=plan["effective_max_grad_norm"],
                             sample_rate=plan["sample_rate"], dataset_size=len(data),
                             micro_batch_size=args.train_batch_size, clipping=plan["clipping"],
                             noise_multiplicity=plan["noise_multiplicity"],
                             proportion_empty_prompts=args.proportion_empty_prompts)
    device, rank = accelerator.device, accelerator.process_index
    secret_seed = args.seed if args.deterministic_noise else None  # None: os.urandom (the private default)
    dp_step = DPSGDStep(unet, noise_scheduler, data, settings, noise_generator(device, _offset(secret_seed, 0)),
                        noise_generator(device, _offset(secret_seed, 1 + rank)), family=family)
    sampler = poisson_sampler(len(data), settings.sample_rate, remaining,
                              noise_generator("cpu", _offset(secret_seed, 1000 + rank)))
    if args.report_to:
        accelerator.init_trackers("dp_sapf", config=tracker_config(args))
    prompts = [args.validation_prompt] if args.validation_prompt else dataset.prompts
    validation_every = args.validation_epochs and args.validation_epochs * max(1, round(1 / settings.sample_rate))
    with state.timed("dp_sgd"):
        bar = tqdm(total=plan["max_train_steps"], initial=start_step, desc="DP-SGD",
                   disable=not accelerator.is_local_main_process)
        unet.train()
        for step, indices in enumerate(sampler, start=start_step + 1):
            state.record_spending("dp_sgd", settings.noise_multiplier, settings.sample_rate,
                                 settings.max_grad_norm)  # before the step touches the data
            with mixed_precision(device, weight_dtype):  # fp16/bf16 compute; fp32 trainable weights and DP sums
                loss = dp_step(torch.as_tensor(indices, dtype=torch.long, device=device))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            bar.update(1)
            state.log_training_loss(step, loss, dp_step.nonfinite_examples)  # local file only
            metrics = {"lr": lr_scheduler.get_last_lr()[0], "dp_sgd_steps": step}
            if args.report_nonprivate_training_loss:
                metrics["train_loss_NOT_PRIVATE"] = loss
            accelerator.log(metrics, step=step)
            if step % args.checkpointing_steps == 0 or step == plan["max_train_steps"]:
                state.save_checkpoint(step, unet, optimizer, lr_scheduler, ema)
            if validation_every and step % validation_every == 0 and accelerator.is_main_process:
                log_validation(accelerator, state.work_dir, step, sample_grid(pipe, family, prompts, args,
                                                                              dataset.resolution))
                unet.train()
        bar.close()
    unet.eval()
    if ema is not None:
        ema.copy_to(params)  # the released adapter (and the samples) are the EMA of the DP iterates

    if accelerator.is_main_process:
        report = build_report(plan, state, dataset.class_names_source)
        over_budget = report.guarantee_epsilon > plan["target_epsilon"]
        if over_budget and not args.allow_over_budget_release:
            raise SystemExit(f"this run spent epsilon {report.guarantee_epsilon:.4g} > target "
                             f"{plan['target_epsilon']:.4g} ({report.accountant}); nothing is released. Pass "
                             "--resume_from_checkpoint latest --allow_over_budget_release to release it anyway")
        deltas = ({n: unet.get_submodule(n).weight.detach().float() - w.float()
                   for n, w in public_weights.items()} if args.no_lora else None)
        if sparse:  # W - W_public, exactly zero outside the mask
            deltas = masked_updates(unet)
        release(args, output_dir, pipe, config, selection, report, dataset, deltas, family,
                base_model_name(pipeline, args))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return unet


def base_model_name(pipeline, args) -> str:
    """The base model as the card and adapter metadata name it: the flag, or a loaded pipeline's
    name_or_path (its Hub id or folder)."""
    if pipeline is None:
        return str(args.pretrained_model_name_or_path)
    return getattr(pipeline, "name_or_path", None) or f"an in-memory {type(pipeline).__name__}"


def sample_grid(pipe, family: ModelFamily, prompts: list[str], args, resolution: int):
    """A grid of --num_validation_images samples per prompt from the pipeline's current (DP) weights at
    --validation_guidance_scale, seeded by the public --seed."""
    family.use_fast_sampler(pipe)
    with mixed_precision(pipe.device, pipe.vae.dtype):  # fp32 trained matrices in an fp16/bf16 pipeline
        return prompt_grid(pipe, prompts, per_prompt=args.num_validation_images, seed=args.seed or 0,
                           guidance_scale=args.validation_guidance_scale, height=resolution, width=resolution,
                           **family.sampling_kwargs())


def log_validation(accelerator: Accelerator, work_dir: Path, step: int, grid) -> None:
    """--validation_epochs: save the grid to <work>/validation/step-<step>.png and send it to the trackers
    (a function of the DP iterate only: post-processing)."""
    folder = work_dir / "validation"
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid)]}, step=step)


def mixed_precision(device: torch.device, weight_dtype: torch.dtype):
    """torch.autocast to the frozen weights' dtype (as diffusers' scripts do with accelerator.autocast, which
    accelerate leaves off on CPU), so fp32 trainable matrices (--no_lora) meet fp16/bf16 activations."""
    enabled = weight_dtype != torch.float32
    return torch.autocast(device.type, dtype=weight_dtype, enabled=enabled)


def _spent(state: RunState) -> list:
    """The stages the ledger holds (main process; [] elsewhere)."""
    return state.ledger.stages() if state.ledger is not None else []


def _offset(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed + offset


# Flags never sent to trackers: credentials and paths of the training machine.
TRACKER_EXCLUDED_FLAGS = {"hub_token", "output_dir", "checkpoint_dir", "train_data_dir", "dataset_name",
                          "pretrained_model_name_or_path", "resume_from_checkpoint", "selection_json", "cache_dir"}


def tracker_config(args) -> dict:
    """The hyperparameters a remote tracker may see: scalars, minus tokens and local paths."""
    return {k: v for k, v in vars(args).items()
            if k not in TRACKER_EXCLUDED_FLAGS and isinstance(v, (int, float, str, bool))}


def build_report(plan: dict, state: RunState, class_names_source: str):
    """The privacy report from the plan and the ledger only (never from the current flags)."""
    stages, recorded = state.ledger.stages(), state.ledger.steps_of(accounting.DP_SGD)
    return accounting.PrivacyReport.build(
        stages, dataset_size=plan["dataset_size"], delta=plan["delta"], target_epsilon=plan["target_epsilon"],
        accountant=plan["accountant"], deterministic_noise=plan["deterministic_noise"],
        adjacency=plan["adjacency"],
        class_names=f"public: {class_names_source}",
        extra={"planned_dp_sgd_steps": plan["max_train_steps"], "recorded_dp_sgd_steps": recorded})


def release(args, output_dir, pipe, config, selection: SelectionResult, report, dataset, deltas,
            family: ModelFamily, base_model: str) -> None:
    """Write the publishable outputs (all DP or public) all-or-nothing, then push if asked."""
    try:
        with hub.staged_release(output_dir) as staging:
            if args.adapter == "lora":
                hub.save_adapter(staging, family.denoiser(pipe), config, matrix_deltas=deltas,
                                 base_model=base_model, family=family)
            else:
                save_loda(staging, family.denoiser(pipe), {"selection_result": selection.to_dict()})
            hub.save_selection(staging, selection.to_dict(), config)
            report.save(str(staging / "privacy_report.json"))
            hub.save_json(staging, "class_prompts.json",
                          {"class_names": dataset.class_names, "prompts": dataset.prompts})
            prompts = [args.validation_prompt] if args.validation_prompt else dataset.prompts
            hub.save_image(staging, "samples.png", sample_grid(pipe, family, prompts, args, dataset.resolution))
            card = hub.model_card(base_model, dataset.description, report, config,
                                  selection.table(), dataset.prompts, args.hub_model_id, args.adapter,
                                  license=args.license, dataset_id=_hub_dataset_id(args),
                                  pipeline_class=family.pipeline_class_name,
                                  guidance_scale=args.validation_guidance_scale)
            card.save(str(staging / "README.md"))
    except OSError as error:
        raise SystemExit(f"could not write the outputs to {output_dir}: {error}. Nothing was released; the "
                         "privacy budget is spent (ledger kept): fix the cause and rerun with "
                         "--resume_from_checkpoint latest to write them without spending more") from error
    logger.info("epsilon %s at delta %.3g (calibrated with %s); outputs in %s",
                {k: round(v, 4) for k, v in report.epsilon.items()}, report.delta, report.accountant, output_dir)
    if args.push_to_hub:
        repo = hub.push_output_dir(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
        logger.info("pushed to https://huggingface.co/%s", repo)


def _hub_dataset_id(args) -> str | None:
    """--dataset_name when it names a Hub dataset (not a local folder)."""
    if args.dataset_name is None or Path(args.dataset_name).expanduser().exists():
        return None
    return args.dataset_name


if __name__ == "__main__":
    main()
