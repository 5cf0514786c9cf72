"""Empirical privacy audit of DP-SAPF: insert canaries, train with the real script, attack, bound epsilon.

    python examples/audit.py --target_epsilons 1 10 inf --output_dir runs/audit
    python examples/audit.py --pretrained_model_name_or_path <an SDXL/SD3/Flux/Sana folder> --resolution 512

Any supported pipeline family (peft_dp_saliency.families): loading, encoding and the canary loss go through it.

1. m random-pattern canaries (each with its own class "canary <i>" by default, or labelled
   round-robin with the existing classes); a random half is inserted into the sensitive set
   (the first --base_samples Fashion-MNIST images), the other half is held out.
2. For each target epsilon, `peft_dp_saliency.train` trains on that set (its main(): the
   training defaults except the flags below).
3. Each canary is scored by its diffusion loss under the trained adapter (averaged over fixed
   timesteps and noises) and by the gain over the public model; a threshold chosen on half of
   the canaries is evaluated on the other half and turned into a Clopper-Pearson lower bound on
   epsilon (heuristic), and the k highest/lowest scores give the rigorous one-run bound of
   Steinke et al. (see peft_dp_saliency.audit). Results: <output_dir>/results.json and a
   Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import datasets
import torch

from peft_dp_saliency import accounting, audit, train
from peft_dp_saliency.data import (DEFAULT_PROMPT_TEMPLATE, SensitiveImageDataset, load_sensitive_dataset,
                                   make_prompts)
from peft_dp_saliency.families import detect_family
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH

# The audit wants the most memorisation DP allows: LoRA of rank 16 on every Linear layer. The
# saliency query still runs and is paid for (ratio 1 keeps all of them), so the audited release
# is DP-SAPF's whole mechanism. A pilot with the training defaults (rank 4, 30% of attention
# q/k/v) memorised too little for any bound (docs/audit.md).
MEMORISING_TRAIN_ARGS = ("--candidate_pool", "all_linear", "--selection_ratio", "1", "--rank", "16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/audit")
    p.add_argument("--pretrained_model_name_or_path", default=str(EMBEDDED_MODEL_PATH),
                   help="Any supported pipeline family (SD, SDXL, SD3, Flux, Sana); default the embedded model.")
    p.add_argument("--resolution", type=int, default=None,
                   help="Image size of the sensitive set, the canaries and training (default: the model's).")
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5/Gemma prompt length of SD3/Flux/Sana (default: the pipeline's).")
    p.add_argument("--target_epsilons", nargs="+", type=float, default=[1.0, 10.0, math.inf])
    p.add_argument("--num_canaries", type=int, default=128, help="m; each is inserted by its own fair coin.")
    p.add_argument("--base_samples", type=int, default=32, help="Fashion-MNIST images besides the canaries.")
    p.add_argument("--target_delta", type=float, default=1e-5,
                   help="delta of the audited runs. The one-run bound pays 2 m delta, so the audit trains at a "
                        "small delta (and audits the epsilon its accountant reports at that delta).")
    p.add_argument("--max_train_steps", type=int, default=400)
    p.add_argument("--expected_batch_size", type=int, default=32)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-3,
                   help="Higher than the training default: the audit wants the most memorisation.")
    p.add_argument("--canary_seed", type=int, default=0, help="Canary images and membership coins.")
    p.add_argument("--canary_grid", type=int, default=8,
                   help="Canaries are grid x grid blocks of random colours, upscaled to the resolution.")
    p.add_argument("--canary_classes", choices=["existing", "own"], default="own",
                   help="Label canaries with the dataset's classes (round-robin) or give each its own class "
                        "and prompt ('An image of a canary 17'; a stronger canary).")
    p.add_argument("--timesteps", nargs="+", type=int, default=[50, 100, 200, 400],
                   help="Where the loss is scored (middle t: where a pilot found the membership signal).")
    p.add_argument("--noises_per_timestep", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.05, help="eps_lb holds with confidence 1 - alpha.")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=list(MEMORISING_TRAIN_ARGS),
                   help="Further flags for train_dp_sapf.py (last option). Default: "
                        f"{' '.join(MEMORISING_TRAIN_ARGS)}.")
    return p.parse_args(argv)


def to_pil(image: torch.Tensor):
    """(3, R, R) in [-1, 1] (exact x / 127.5 - 1 of uint8) back to the RGB PIL image."""
    from PIL import Image

    pixels = ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels, mode="RGB")


def build_sensitive_set(base: SensitiveImageDataset, canaries: audit.Canaries, class_names: list[str],
                        folder: Path) -> int:
    """Save base images + inserted canaries as a `datasets` dataset; returns N."""
    images = [to_pil(base[i][0]) for i in range(len(base))]
    labels = base.labels.tolist()
    for index in canaries.inserted.nonzero().flatten().tolist():
        images.append(canaries.images[index])
        labels.append(int(canaries.labels[index]))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(folder))
    return len(images)


def canary_losses(family, pipe, noise_scheduler, encoded, args) -> torch.Tensor:
    return audit.mean_diffusion_loss(family, family.denoiser(pipe), noise_scheduler, encoded, args.timesteps,
                                     args.noises_per_timestep, seed=args.canary_seed + 1)


def epsilon_name(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:.4g}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()
    family = detect_family(args.pretrained_model_name_or_path)  # SD, SDXL, SD3, Flux, Sana; else a clear error
    resolution = args.resolution or family.default_resolution(args.pretrained_model_name_or_path)
    family.check_resolution(resolution)
    sequence = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    base = load_sensitive_dataset(max_examples=args.base_samples, resolution=resolution)
    canaries = audit.make_canaries(args.num_canaries, base.resolution, len(base.class_names), args.canary_seed,
                                   own_classes=args.canary_classes == "own", grid=args.canary_grid)
    class_names = base.class_names + canaries.new_class_names
    n = build_sensitive_set(base, canaries, class_names, out / "sensitive_with_canaries")
    canary_set = SensitiveImageDataset(canaries.images, canaries.labels, class_names,
                                       make_prompts(class_names, DEFAULT_PROMPT_TEMPLATE), base.resolution,
                                       "canaries")

    if Path(args.pretrained_model_name_or_path).is_dir():  # one fixed copy for scoring and every run
        model = out / "public_model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(args.pretrained_model_name_or_path, model)
        args.pretrained_model_name_or_path = str(model)
    pipe = family.load_pipeline(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    noise_scheduler = family.noise_scheduler(args.pretrained_model_name_or_path)
    encoded = family.encode_dataset(pipe, canary_set, show_progress=False, resolution=resolution, **sequence)
    public_loss = canary_losses(family, pipe, noise_scheduler, encoded, args)

    results = {"setup": {"N": n, "family": family.name, "resolution": resolution,
                         "base_samples": args.base_samples, "canaries": args.num_canaries,
                         "inserted": int(canaries.inserted.sum()), "target_delta": args.target_delta,
                         "max_train_steps": args.max_train_steps,
                         "expected_batch_size": args.expected_batch_size, "learning_rate": args.learning_rate,
                         "timesteps": args.timesteps,
                         "noises_per_timestep": args.noises_per_timestep, "alpha": args.alpha,
                         "canary_classes": args.canary_classes, "canary_grid": args.canary_grid,
                         # The loss statistic on the untrained public model: no membership signal can
                         # exist, so this is the chance level of this particular canary draw.
                         "public_model_loss_auc": audit.auc(-public_loss.double().numpy(),
                                                            canaries.inserted.numpy()),
                         "train_args": args.train_args},
               "runs": []}
    for epsilon in args.target_epsilons:
        run_dir = out / f"eps-{epsilon_name(epsilon)}"
        started = time.time()
        train.main(["--dataset_name", str(out / "sensitive_with_canaries"), "--output_dir", str(run_dir),
                     "--overwrite_output_dir", "--target_epsilon", str(epsilon),
                     "--max_train_steps", str(args.max_train_steps),
                     "--expected_batch_size", str(args.expected_batch_size),
                     "--train_batch_size", str(args.train_batch_size),
                     "--learning_rate", str(args.learning_rate), "--target_delta", str(args.target_delta),
                     "--checkpointing_steps", str(args.max_train_steps),
                     "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                     "--resolution", str(resolution),
                     *(["--max_sequence_length", str(args.max_sequence_length)] if sequence else []),
                     "--num_validation_images", "1", "--validation_prompt", base.prompts[0],
                     *args.train_args])
        train_seconds = time.time() - started
        report = accounting.PrivacyReport.load(str(run_dir / "privacy_report.json"))
        pipe.load_lora_weights(str(run_dir))
        trained_loss = canary_losses(family, pipe, noise_scheduler, encoded, args)
        pipe.unload_lora_weights()
        statistics = audit.membership_scores(trained_loss, public_loss)
        # Bonferroni over the statistics too: the headline is the best of them, so each is tested
        # at alpha / (number of statistics) and picking the best is paid for.
        attacks = [audit.attack(name, scores, canaries, report.delta, args.alpha / len(statistics))
                   for name, scores in statistics.items()]
        evaluation, members = attacks[0], canaries.inserted.numpy()
        results["runs"].append({
            "target_epsilon": epsilon_name(epsilon), "epsilon_pld": epsilon_name(report.epsilon["pld"]),
            "delta": report.delta, "private": report.private, "train_seconds": round(train_seconds, 1),
            "max_provable_epsilon": audit.max_provable_epsilon(evaluation.evaluation_members,
                                                               evaluation.evaluation_non_members,
                                                               report.delta, args.alpha),
            # what a perfect attack (scores = membership) would show with the one-run bound
            "max_provable_epsilon_one_run": audit.one_run_attack(members.astype(float), members, report.delta,
                                                                 args.alpha)[0],
            "mean_loss_members": float(trained_loss[canaries.inserted].mean()),
            "mean_loss_non_members": float(trained_loss[~canaries.inserted].mean()),
            # how far training moved the canaries' losses at all (0 exactly: the adapter changed nothing)
            "mean_loss_gain": float((public_loss - trained_loss).mean()),
            "attacks": [a.to_dict() for a in attacks]})
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    rows = ["| target eps | reported eps (PLD) | statistic | AUC | **eps_lb one-run (95%)** | correct / guesses "
            "| max provable one-run | eps_lb Clopper-Pearson (heuristic) | TPR / FPR (eval half) "
            "| eps_lb, threshold on all (optimistic) | max provable C-P |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        eps = run["epsilon_pld"]
        for a in run["attacks"]:
            rows.append(f"| {run['target_epsilon']} | {eps} | {a['statistic']} | {a['auc']:.3f} | "
                        f"**{a['eps_lb_one_run']:.3f}** | {a['one_run_correct']} / {a['one_run_guesses']} | "
                        f"{run['max_provable_epsilon_one_run']:.2f} | {a['eps_lb']:.3f} | "
                        f"{a['tpr']:.2f} / {a['fpr']:.2f} | {a['eps_lb_all_canaries']:.3f} | "
                        f"{run['max_provable_epsilon']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
