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

import argparse
import json
import logging
import math
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from tqdm.auto import tqdm

from peft_dp_saliency import accounting, hub
from peft_dp_saliency.candidates import SPARSE_UNITS
from peft_dp_saliency.data import load_sensitive_dataset
from peft_dp_saliency.families import SUPPORTED_PIPELINES, ModelFamily, detect_family
from peft_dp_saliency.loda import add_loda_adapters, load_adapter, save_loda
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep, broadcast_trainable, poisson_sampler
from peft_dp_saliency.noise import noise_generator
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH
from peft_dp_saliency.run_state import RunState
from peft_dp_saliency.sampling import prompt_grid
from peft_dp_saliency.sharding import encode_shard
from peft_dp_saliency.select import add_selection_arguments, config_from_args
from peft_dp_saliency.selection import SelectionResult, load_paid_selection, reselect, select_target_modules
from peft_dp_saliency.sparse import add_masked_deltas, masked_updates

logger = logging.getLogger("train_dp_sapf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data (names as in diffusers' train_text_to_image_lora.py)")
    g.add_argument("--pretrained_model_name_or_path", default=str(EMBEDDED_MODEL_PATH))
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--dataset_name", default=None,
                   help="A datasets Hub name or a saved dataset folder; default: Debian's Fashion-MNIST.")
    g.add_argument("--train_data_dir", default=None, help="An imagefolder (one subfolder per class).")
    g.add_argument("--image_column", default="image")
    g.add_argument("--label_column", default="label")
    g.add_argument("--prompt_template", default="An image of a {}")
    g.add_argument("--class_names", nargs="+", default=None,
                   help="The public class list, in label order (required when the label column is not a "
                        "datasets.ClassLabel: class names are released, so they must never be read off the data).")
    g.add_argument("--class_prompts", nargs="+", default=None,
                   help="One prompt per class (overrides --prompt_template).")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Use the first K examples only (N = K in the privacy analysis).")
    g.add_argument("--resolution", type=int, default=None, help="Default: the VAE's sample_size.")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3 / Flux / Sana: text tokens of the T5/Gemma prompt encoder (default: the family's).")
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="dp-sapf-model")
    g.add_argument("--checkpoint_dir", default=None,
                   help="Checkpoints, spending ledger and local logs (not published). Default: <output_dir>-work.")
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="Default: rank.")
    g.add_argument("--no_lora", action="store_true", help="DP-SGD directly on the selected matrices.")
    g.add_argument("--adapter", default="lora", choices=["lora", "loda", "loda_plus"],
                   help="lora; or LoDA / LoDA+ (W x + B f(A x), f a small residual non-linear map on r dims, "
                        "Lowy et al.): released as loda_adapter.safetensors, loaded with "
                        "peft_dp_saliency.load_adapter(pipe, dir).")
    g.add_argument("--learning_rate", type=float, default=2e-3)
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_train_steps", type=int, default=200)
    g.add_argument("--train_batch_size", type=int, default=64, help="Micro-batch (memory only).")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--checkpointing_steps", type=int, default=50)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--seed", type=int, default=None,
                   help="Seeds what is data-independent (LoRA init, random selection, sample grids). Never the "
                        "mechanisms' randomness (DP noise, Poisson sampling, timesteps and diffusion noise of "
                        "each example), which is secret (os.urandom), unless --deterministic_noise.")
    g.add_argument("--report_to", default=None,
                   help="accelerate trackers (tensorboard, wandb). They receive only public or DP values: the "
                        "hyperparameters (no token, no local path), the learning rate, the steps spent and "
                        "samples. The un-noised training loss goes to <output_dir>-work/train_loss.csv only.")
    g.add_argument("--report_nonprivate_training_loss", action="store_true",
                   help="ALSO send the un-noised training loss (computed on the sensitive data, NOT covered by "
                        "the DP guarantee) to the --report_to trackers. Off by default.")
    g.add_argument("--validation_prompt", default=None, help="Default: the class prompts.")
    g.add_argument("--num_validation_images", type=int, default=8)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")
    g.add_argument("--license", default=None,
                   help="License of the released adapter. Default: the base model's card license (SD-1.5: "
                        "creativeml-openrail-m), 'other' when it cannot be read.")
    g = p.add_argument_group("differential privacy")
    g.add_argument("--target_epsilon", type=float, default=10.0, help="'inf' trains without privacy.")
    g.add_argument("--target_delta", type=float, default=None, help="Default: 1/(N ln N).")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="C: the per-example clipping norm (not diffusers' global gradient-norm clip). With "
                        "--clipping automatic every example contributes C g/(||g|| + 0.01), so C only scales.")
    g.add_argument("--clipping", default="automatic", choices=["automatic", "flat"],
                   help="automatic: per-example normalisation (Bu et al. 2023), no C to tune; flat: min(1, C/||g||) "
                        "(Abadi et al. 2016), which needs C matched to the gradients (never chosen from un-noised "
                        "norms of the sensitive data: that is a release). Both have sensitivity C.")
    g.add_argument("--noise_multiplicity", type=int, default=1,
                   help="K (timestep, noise) draws averaged per example before clipping (DPDM): free in privacy, "
                        "K x compute and memory per micro-batch.")
    g.add_argument("--use_ema", action="store_true",
                   help="Release the exponential moving average of the DP iterates (post-processing: free).")
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--expected_batch_size", type=int, default=512, help="Logical batch: q = this / N.")
    g.add_argument("--accountant", default="pld", choices=list(accounting.ACCOUNTANTS))
    g.add_argument("--adjacency", default=accounting.DEFAULT_ADJACENCY, choices=sorted(accounting.ADJACENCIES),
                   help="zero_out: one example replaced by a null example, N public (what dividing by the fixed N "
                        "proves); replace_one: one example replaced by another (sensitivity 2C; PLD only).")
    g.add_argument("--allow_over_budget_release", action="store_true",
                   help="Release even if the spent epsilon exceeds --target_epsilon (the model card says so). "
                        "Without it such a run stops before spending more and releases nothing.")
    g.add_argument("--deterministic_noise", action="store_true",
                   help="Tests only: seed every mechanism's randomness from --seed. NOT private.")
    g.add_argument("--selection_json", default=None,
                   help="Reuse a saliency query paid for earlier (`python -m peft_dp_saliency.select` output or a "
                        "release's selection.json) instead of running one: --selection_ratio re-ranks its noisy "
                        "scores (post-processing) and this run's report still counts the query.")
    add_selection_arguments(p)
    return p.parse_args(argv)


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
                 "num_validation_images", "noise_multiplicity", "selection_noise_multiplicity"):
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
    if problems:
        raise SystemExit("invalid arguments: " + "\n  ".join(problems))


def model_family(path: str, revision: str | None = None) -> ModelFamily:
    """The model family of --pretrained_model_name_or_path (from its model_index.json), checked before
    anything is read: a local folder must hold that family's files; an unsupported pipeline exits."""
    folder = Path(path).expanduser()
    if not folder.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise SystemExit(f"--pretrained_model_name_or_path {path} does not exist (and is not a Hub model id)")
    if folder.exists() and not (folder / "model_index.json").is_file():
        raise SystemExit(f"--pretrained_model_name_or_path {path} is not a diffusers Stable Diffusion folder "
                         "(missing model_index.json): pass a folder saved with <Pipeline>.save_pretrained "
                         f"(supported: {', '.join(SUPPORTED_PIPELINES)}) or a Hub model id")
    with input_errors(f"cannot load the model {path}"):
        family = detect_family(path, revision=revision)
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
            "selection_sample_rate": args.selection_sample_rate}


def adopt_paid_selection(args, n: int) -> SelectionResult:
    """Load --selection_json and make the run's selection flags describe that query (it is counted)."""
    with input_errors(f"--selection_json {args.selection_json}"):
        paid = load_paid_selection(args.selection_json)
    mechanism = paid.mechanism
    mismatched = [f"{what}: query {theirs!r}, run {ours!r}" for what, theirs, ours in (
        ("dataset size", mechanism["dataset_size"], n), ("--candidate_pool", paid.pool, args.candidate_pool),
        ("--selection_unit", paid.unit, args.selection_unit)) if theirs != ours]
    if mismatched or args.selection_strategy != "saliency":
        raise SystemExit(f"--selection_json {args.selection_json} does not fit this run ("
                         + "; ".join(mismatched or ["--selection_strategy must be saliency"]) + ")")
    args.selection_noise_multiplier = float(mechanism["noise_multiplier"])
    args.selection_max_grad_norm = float(mechanism["max_grad_norm"])
    args.selection_sample_rate = float(mechanism["sample_rate"])
    return paid


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
    """What a finished run released (all DP outputs): the folder, its privacy report and selection."""

    output_dir: Path
    report: accounting.PrivacyReport
    selection: SelectionResult

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

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False) -> str:
        """Upload exactly the released files (allow-list checked); returns the repo id."""
        return hub.push_output_dir(self.output_dir, repo_id, token=token, private=private)


def fit(output_dir: str | Path, **flags) -> TrainingResult:
    """The whole run from Python: `fit("out", target_epsilon=1, max_train_steps=100, use_ema=True)`.

    Keyword arguments are the command-line flags (`python -m peft_dp_saliency.train --help`; True for a
    switch, a list for a multi-value flag); an unknown name raises TypeError before anything runs.
    """
    known = vars(parse_args([]))
    unknown = sorted(set(flags) - set(known))
    if unknown:
        raise TypeError(f"unknown training options {unknown}; see python -m peft_dp_saliency.train --help")
    argv = ["--output_dir", str(output_dir)]
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
    main(argv)
    return TrainingResult.load(output_dir)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    family = model_family(args.pretrained_model_name_or_path, args.revision)
    output_dir = Path(args.output_dir)
    work_dir = Path(args.checkpoint_dir or f"{args.output_dir.rstrip('/')}-work")
    accelerator = make_accelerator(args, work_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = RunState(work_dir, output_dir, resume=args.resume_from_checkpoint,
                     overwrite=args.overwrite_output_dir, is_main=accelerator.is_main_process)
    # SIGTERM (kill, a launcher stopping its workers) unwinds like an error, so temporary files go.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        train(args, accelerator, state, output_dir, family)
    except BaseException:
        state.discard_if_unspent()  # a failure before any spending leaves no trace
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def train(args, accelerator: Accelerator, state: RunState, output_dir: Path, family: ModelFamily) -> None:
    if args.seed is not None:
        set_seed(args.seed)  # data-independent randomness only (LoRA init, random selection)

    # Setup: every input error surfaces here, before the ledger records any spending.
    with input_errors(f"cannot load the model {args.pretrained_model_name_or_path}"):
        resolution = args.resolution or family.default_resolution(args.pretrained_model_name_or_path, args.revision)
    with input_errors("cannot load the sensitive dataset"):
        dataset = load_sensitive_dataset(
            args.train_data_dir or args.dataset_name, resolution=resolution,
            image_column=args.image_column, label_column=args.label_column,
            prompt_template=args.prompt_template, prompts=args.class_prompts, class_names=args.class_names,
            max_examples=args.max_train_samples)
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
    logger.info("N=%d q=%.4g sigma=%.4g delta=%.3g over %d steps", plan["dataset_size"], plan["sample_rate"],
                plan["noise_multiplier"], plan["delta"], plan["max_train_steps"])

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    with input_errors(f"cannot load the model {args.pretrained_model_name_or_path}"):
        pipe = family.load_pipeline(args.pretrained_model_name_or_path, revision=args.revision,
                                    variant=args.variant, torch_dtype=weight_dtype)
        noise_scheduler = family.noise_scheduler(args.pretrained_model_name_or_path, revision=args.revision)
    pipe.set_progress_bar_config(disable=True)
    for module in family.frozen_modules(pipe):
        module.requires_grad_(False)
    pipe.to(accelerator.device)  # before adding adapters (opacus#820-style device mismatches)
    unet = family.denoiser(pipe)  # the UNet, or the transformer of SD3 / Flux / Sana
    with input_errors("--candidate_pool"):
        family.candidates(unet, args.candidate_pool)
    with state.timed("encode"):
        sequence = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
        data = encode_shard(family, pipe, dataset, batch_size=args.selection_batch_size,  # this rank's examples
                            show_progress=accelerator.is_local_main_process, resolution=resolution,
                            **sequence)
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
                             noise_multiplicity=plan["noise_multiplicity"])
    device, rank = accelerator.device, accelerator.process_index
    secret_seed = args.seed if args.deterministic_noise else None  # None: os.urandom (the private default)
    dp_step = DPSGDStep(unet, noise_scheduler, data, settings, noise_generator(device, _offset(secret_seed, 0)),
                        noise_generator(device, _offset(secret_seed, 1 + rank)), family=family)
    sampler = poisson_sampler(len(data), settings.sample_rate, remaining,
                              noise_generator("cpu", _offset(secret_seed, 1000 + rank)))
    if args.report_to:
        accelerator.init_trackers("dp_sapf", config=tracker_config(args))
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
        bar.close()
    unet.eval()
    if ema is not None:
        ema.copy_to(params)  # the released adapter (and the samples) are the EMA of the DP iterates

    if accelerator.is_main_process:
        report = build_report(plan, state, args.deterministic_noise, dataset.class_names_source)
        over_budget = report.guarantee_epsilon > plan["target_epsilon"]
        if over_budget and not args.allow_over_budget_release:
            raise SystemExit(f"this run spent epsilon {report.guarantee_epsilon:.4g} > target "
                             f"{plan['target_epsilon']:.4g} ({report.accountant}); nothing is released. Pass "
                             "--resume_from_checkpoint latest --allow_over_budget_release to release it anyway")
        deltas = ({n: unet.get_submodule(n).weight.detach().float() - w.float()
                   for n, w in public_weights.items()} if args.no_lora else None)
        if sparse:  # W - W_public, exactly zero outside the mask
            deltas = masked_updates(unet)
        release(args, output_dir, pipe, config, selection, report, dataset, deltas, family)
    accelerator.wait_for_everyone()
    accelerator.end_training()


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
                          "pretrained_model_name_or_path", "resume_from_checkpoint", "selection_json"}


def tracker_config(args) -> dict:
    """The hyperparameters a remote tracker may see: scalars, minus tokens and local paths."""
    return {k: v for k, v in vars(args).items()
            if k not in TRACKER_EXCLUDED_FLAGS and isinstance(v, (int, float, str, bool))}


def build_report(plan: dict, state: RunState, deterministic_noise: bool, class_names_source: str):
    """The privacy report from the plan and the ledger only (never from the current flags)."""
    stages = state.ledger.stages()
    recorded = sum(stage.steps for stage in stages if stage.name == accounting.DP_SGD)
    return accounting.PrivacyReport.build(
        stages, dataset_size=plan["dataset_size"], delta=plan["delta"], target_epsilon=plan["target_epsilon"],
        accountant=plan["accountant"], deterministic_noise=deterministic_noise, adjacency=plan["adjacency"],
        class_names=f"public: {class_names_source}",
        extra={"planned_dp_sgd_steps": plan["max_train_steps"], "recorded_dp_sgd_steps": recorded})


def release(args, output_dir, pipe, config, selection: SelectionResult, report, dataset, deltas,
            family: ModelFamily) -> None:
    """Write the publishable outputs (all DP or public) all-or-nothing, then push if asked."""
    try:
        with hub.staged_release(output_dir) as staging:
            if args.adapter == "lora":
                hub.save_adapter(staging, family.denoiser(pipe), config, matrix_deltas=deltas,
                                 base_model=str(args.pretrained_model_name_or_path), family=family)
            else:
                save_loda(staging, family.denoiser(pipe), {"selection_result": selection.to_dict()})
            hub.save_selection(staging, selection.to_dict(), config)
            report.save(str(staging / "privacy_report.json"))
            hub.save_json(staging, "class_prompts.json",
                          {"class_names": dataset.class_names, "prompts": dataset.prompts})
            prompts = [args.validation_prompt] if args.validation_prompt else dataset.prompts
            family.use_fast_sampler(pipe)
            with mixed_precision(pipe.device, pipe.vae.dtype):  # fp32 trained matrices in an fp16/bf16 pipeline
                grid = prompt_grid(pipe, prompts, per_prompt=args.num_validation_images, seed=args.seed or 0,
                                   height=dataset.resolution, width=dataset.resolution)
            hub.save_image(staging, "samples.png", grid)
            card = hub.model_card(str(args.pretrained_model_name_or_path), dataset.description, report, config,
                                  selection.table(), dataset.prompts, args.hub_model_id, args.adapter,
                                  license=args.license, dataset_id=_hub_dataset_id(args),
                                  pipeline_class=family.pipeline_class_name)
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
