#!/usr/bin/env python
"""DP-SAPF: differentially private saliency-aware LoRA fine-tuning of a text-to-image model.

    accelerate launch examples/train_dp_sapf.py --target_epsilon 10 --output_dir dp-sapf-fmnist

With no flags it adapts the embedded public model to Fashion-MNIST (Debian's dataset-fashion-mnist).
Stages: (1) private saliency query over all candidate matrices -> target_modules, (2) LoRA on those
matrices trained with DP-SGD (Poisson sampling, per-sample clipping, noise once per step),
(3) one accountant for both, (4) release: adapter, privacy report, samples, model card [, Hub push].

Baselines by flags: --selection_strategy all (DP-LoRA), random, --selection_unit layer,
--candidate_pool attn_qkvo, --no_lora (DP-SGD on the selected matrices), --target_epsilon inf.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from peft_dp_saliency import accounting, hub
from peft_dp_saliency.candidates import find_candidates
from peft_dp_saliency.data import load_sensitive_dataset
from peft_dp_saliency.diffusion import encode_dataset
from peft_dp_saliency.dp_sgd import DPSGDSettings, DPSGDStep, broadcast_trainable, poisson_sampler
from peft_dp_saliency.noise import noise_generator
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH
from peft_dp_saliency.run_state import RunState
from peft_dp_saliency.sampling import prompt_grid, use_dpm_solver
from peft_dp_saliency.select import add_selection_arguments, config_from_args
from peft_dp_saliency.selection import SelectionResult, select_target_modules

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
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Use the first K examples only (N = K in the privacy analysis).")
    g.add_argument("--resolution", type=int, default=None, help="Default: the VAE's sample_size.")
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="dp-sapf-model")
    g.add_argument("--checkpoint_dir", default=None,
                   help="Checkpoints, spending ledger and local logs (not published). Default: <output_dir>-work.")
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="Default: rank.")
    g.add_argument("--no_lora", action="store_true", help="DP-SGD directly on the selected matrices.")
    g.add_argument("--learning_rate", type=float, default=1e-3)
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
                   help="Data randomness (timesteps, diffusion noise, sampling). Never seeds the DP noise.")
    g.add_argument("--report_to", default=None, help="accelerate trackers (tensorboard, wandb), local only.")
    g.add_argument("--validation_prompt", default=None, help="Default: the class prompts.")
    g.add_argument("--num_validation_images", type=int, default=8)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g = p.add_argument_group("differential privacy")
    g.add_argument("--target_epsilon", type=float, default=10.0, help="'inf' trains without privacy.")
    g.add_argument("--target_delta", type=float, default=None, help="Default: 1/(N ln N).")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--expected_batch_size", type=int, default=256, help="Logical batch: q = this / N.")
    g.add_argument("--accountant", default="pld", choices=list(accounting.ACCOUNTANTS))
    g.add_argument("--deterministic_noise", action="store_true", help="Tests only: NOT private.")
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
                 "learning_rate", "selection_batch_size", "selection_noise_multiplier",
                 "selection_max_grad_norm", "checkpointing_steps", "num_validation_images"):
        if not getattr(args, flag) > 0:
            problems.append(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.max_train_samples is not None and args.max_train_samples < 2:
        problems.append(f"--max_train_samples must be >= 2, got {args.max_train_samples}")
    if args.push_to_hub and not args.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id")
    if args.dataset_name and args.train_data_dir:
        problems.append("give either --dataset_name or --train_data_dir, not both")
    if problems:
        raise SystemExit("invalid arguments: " + "\n  ".join(problems))


def check_model_folder(path: str) -> None:
    """A local --pretrained_model_name_or_path must be a diffusers Stable Diffusion folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if path.startswith((".", "/", "~")) or path.count("/") > 1:
            raise SystemExit(f"--pretrained_model_name_or_path {path} does not exist (and is not a Hub model id)")
        return  # a Hub model id: from_pretrained reports what is wrong with it
    missing = [name for name in ("model_index.json", "unet/config.json", "vae/config.json",
                                 "text_encoder/config.json", "scheduler/scheduler_config.json")
               if not (folder / name).is_file()]
    if missing or not (folder / "tokenizer").is_dir():
        raise SystemExit(f"--pretrained_model_name_or_path {path} is not a diffusers Stable Diffusion folder "
                         f"(missing {', '.join(missing) or 'tokenizer/'}): pass a folder saved with "
                         "StableDiffusionPipeline.save_pretrained or a Hub model id")


@contextmanager
def input_errors(what: str):
    """Turn the library's input errors during setup (before any spending) into a one-line exit."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise SystemExit(f"{what}: {error}") from error


def plan_privacy(args, n: int) -> dict:
    """Sampling rate, delta and calibrated sigma: fails (BudgetCannotBeMetError) before data is used."""
    if args.expected_batch_size > n:
        raise SystemExit(f"--expected_batch_size {args.expected_batch_size} exceeds the dataset size {n}: "
                         "lower it (the sampling rate q = batch / N must be <= 1)")
    delta = args.target_delta if args.target_delta is not None else accounting.default_delta(n)
    with input_errors("--target_delta"):
        accounting.check_delta(delta, n)
    q = args.expected_batch_size / n
    private = math.isfinite(args.target_epsilon)
    selection = []
    if args.selection_strategy == "saliency":
        selection = [accounting.selection_stage(args.selection_noise_multiplier, args.selection_max_grad_norm)]
    with input_errors("--target_epsilon"):
        sigma = accounting.calibrate_noise_multiplier(
            args.target_epsilon, delta, q, args.max_train_steps, fixed_stages=selection,
            accountant=args.accountant, dataset_size=n) if private else 0.0
    return {"delta": delta, "sample_rate": q, "noise_multiplier": sigma, "dataset_size": n,
            "max_grad_norm": args.max_grad_norm if private else math.inf}


def make_accelerator(args, work_dir: Path) -> Accelerator:
    """The Accelerator; several processes without a GPU run on CPU with gloo.

    `accelerate launch --multi_gpu --num_processes 2` (or torchrun) on a CPU-only machine starts a
    process group that accelerate does not recognise unless cpu=True, so every process would act
    as the main one; we pass cpu=True there and check that accelerate sees all processes.
    """
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_dir=str(work_dir))
    if dist.is_initialized() and dist.get_world_size() != accelerator.num_processes:
        raise SystemExit(f"{dist.get_world_size()} processes are running but accelerate sees "
                         f"{accelerator.num_processes}: launch with `accelerate launch --multi_gpu "
                         "--num_processes K` (CPU: gloo) or torchrun")
    return accelerator


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    check_model_folder(args.pretrained_model_name_or_path)
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
        train(args, accelerator, state, output_dir)
    except BaseException:
        state.discard_if_unspent()  # a failure before any spending leaves no trace
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def train(args, accelerator: Accelerator, state: RunState, output_dir: Path) -> None:
    if args.seed is not None:
        set_seed(args.seed)

    # Setup: every input error surfaces here, before the ledger records any spending.
    with input_errors(f"cannot load the model {args.pretrained_model_name_or_path}"):
        resolution = args.resolution or _vae_resolution(args)
    with input_errors("cannot load the sensitive dataset"):
        dataset = load_sensitive_dataset(
            args.train_data_dir or args.dataset_name, resolution=resolution,
            image_column=args.image_column, label_column=args.label_column,
            prompt_template=args.prompt_template, max_examples=args.max_train_samples)
    if len(dataset) < 2:
        raise SystemExit(f"the sensitive dataset has {len(dataset)} example(s); DP training needs at least 2")
    plan = broadcast_object_list([state.plan(lambda: plan_privacy(args, len(dataset)))])[0]
    logger.info("N=%d q=%.4g sigma=%.4g delta=%.3g over %d steps", len(dataset), plan["sample_rate"],
                plan["noise_multiplier"], plan["delta"], args.max_train_steps)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    with input_errors(f"cannot load the model {args.pretrained_model_name_or_path}"):
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                       variant=args.variant, torch_dtype=weight_dtype,
                                                       safety_checker=None, requires_safety_checker=False)
        noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                        revision=args.revision)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
    pipe.to(accelerator.device)  # before adding adapters (opacus#820-style device mismatches)
    unet = pipe.unet
    with input_errors("--candidate_pool"):
        find_candidates(unet, args.candidate_pool)
    with state.timed("encode"):
        data = encode_dataset(pipe, dataset, batch_size=args.selection_batch_size,
                              show_progress=accelerator.is_local_main_process)
    data_seed = args.seed if args.seed is not None else int(torch.seed() % 2**31)
    noise_seed = args.seed if args.deterministic_noise else None

    config = config_from_args(args, data_seed, r=args.rank, lora_alpha=args.lora_alpha or args.rank,
                              init_lora_weights="gaussian")
    selection = state.selection()
    if selection is None:
        if args.selection_strategy == "saliency":  # spend first, then run: never refunded
            state.record_spending("selection", args.selection_noise_multiplier, 1.0, args.selection_max_grad_norm)
        with state.timed("selection"):
            selection = select_target_modules(unet, noise_scheduler, data, config, args.selection_batch_size,
                                              show_progress=accelerator.is_local_main_process)
        selection = broadcast_object_list([selection])[0]
        state.save_selection(selection)
    config.target_modules = selection.selected
    config.selection_result = selection.to_dict()
    logger.info("selected %d of %d matrices\n%s", len(selection.selected), len(selection.units_flat()),
                selection.table())

    public_weights = {}
    if args.no_lora:
        for name in selection.selected:
            weight = unet.get_submodule(name).weight
            public_weights[name] = weight.detach().clone()
            weight.requires_grad_(True)
    else:
        unet.add_adapter(config)
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps)
    start_step = state.load_checkpoint(unet, optimizer, lr_scheduler)
    broadcast_trainable(unet)  # replicas start identical (random LoRA init) and stay so

    settings = DPSGDSettings(noise_multiplier=plan["noise_multiplier"], max_grad_norm=plan["max_grad_norm"],
                             sample_rate=plan["sample_rate"], dataset_size=len(data),
                             micro_batch_size=args.train_batch_size)
    device = accelerator.device
    dp_step = DPSGDStep(unet, noise_scheduler, data, settings, noise_generator(device, noise_seed),
                        torch.Generator(device=device).manual_seed(data_seed + 1 + accelerator.process_index))
    sampling_seed = None if noise_seed is None else noise_seed + 2 + accelerator.process_index
    sampler = poisson_sampler(len(data), settings.sample_rate, args.max_train_steps - start_step,
                              noise_generator("cpu", sampling_seed))
    if args.report_to:
        accelerator.init_trackers("dp_sapf", config={k: v for k, v in vars(args).items()
                                                     if isinstance(v, (int, float, str, bool))})
    with state.timed("dp_sgd"):
        bar = tqdm(total=args.max_train_steps, initial=start_step, desc="DP-SGD",
                   disable=not accelerator.is_local_main_process)
        unet.train()
        for step, indices in enumerate(sampler, start=start_step + 1):
            state.record_spending("dp_sgd", settings.noise_multiplier, settings.sample_rate,
                                 settings.max_grad_norm)  # before the step touches the data
            loss = dp_step(torch.as_tensor(indices, dtype=torch.long, device=device))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            accelerator.log({"train_loss_local_only": loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
                state.save_checkpoint(step, unet, optimizer, lr_scheduler)
        bar.close()
    unet.eval()

    if accelerator.is_main_process:
        stages = state.ledger.stages()
        recorded = sum(stage.steps for stage in stages if stage.name == accounting.DP_SGD)
        report = accounting.PrivacyReport.build(
            stages, dataset_size=len(data), delta=plan["delta"],
            target_epsilon=args.target_epsilon, accountant=args.accountant,
            deterministic_noise=args.deterministic_noise,
            extra={"planned_dp_sgd_steps": args.max_train_steps, "recorded_dp_sgd_steps": recorded})
        if report.epsilon[args.accountant] > args.target_epsilon:
            logger.warning("this run spent epsilon %.4g > target %.4g: %d DP-SGD steps touched the data "
                           "(planned %d; steps lost in a crash after the last checkpoint still count)",
                           report.epsilon[args.accountant], args.target_epsilon, recorded, args.max_train_steps)
        deltas = ({n: unet.get_submodule(n).weight.detach().float() - w.float()
                   for n, w in public_weights.items()} if args.no_lora else None)
        release(args, output_dir, pipe, config, selection, report, dataset, deltas)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def release(args, output_dir, pipe, config, selection: SelectionResult, report, dataset, deltas) -> None:
    """Write the publishable outputs (all DP or public) all-or-nothing, then push if asked."""
    try:
        with hub.staged_release(output_dir) as staging:
            hub.save_adapter(staging, pipe.unet, config, matrix_deltas=deltas)
            hub.save_json(staging, "selection.json", selection.to_dict())
            report.save(str(staging / "privacy_report.json"))
            hub.save_json(staging, "class_prompts.json",
                          {"class_names": dataset.class_names, "prompts": dataset.prompts})
            prompts = [args.validation_prompt] if args.validation_prompt else dataset.prompts
            use_dpm_solver(pipe)
            grid = prompt_grid(pipe, prompts, per_prompt=args.num_validation_images, seed=args.seed or 0)
            hub.save_image(staging, "samples.png", grid)
            card = hub.model_card(str(args.pretrained_model_name_or_path), dataset.description, report, config,
                                  selection.table(), dataset.prompts, args.hub_model_id)
            card.save(str(staging / "README.md"))
    except OSError as error:
        raise SystemExit(f"could not write the outputs to {output_dir}: {error}. Nothing was released; the "
                         "privacy budget is spent (ledger kept): fix the cause and rerun with "
                         "--resume_from_checkpoint latest to write them without spending more") from error
    logger.info("epsilon: PLD %.4g, RDP %.4g at delta %.3g; outputs in %s", report.epsilon["pld"],
                report.epsilon["rdp"], report.delta, output_dir)
    if args.push_to_hub:
        repo = hub.push_output_dir(output_dir, args.hub_model_id, token=args.hub_token)
        logger.info("pushed to https://huggingface.co/%s", repo)


def _vae_resolution(args) -> int:
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
    return int(config.get("sample_size", 512))


if __name__ == "__main__":
    main()
