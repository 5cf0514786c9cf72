"""Run the training command (`peft_dp_saliency.train`, what examples/train_dp_sapf.py calls) in-process."""

import json
from pathlib import Path

from peft_dp_saliency import train

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_dp_sapf.py"


def training_script():
    """The training module (its main() is the command line; tests patch its attributes)."""
    return train


def tiny_argv(output_dir, *extra, samples=24, steps=2, batch=8) -> list[str]:
    """Fashion-MNIST, N=samples, `steps` DP-SGD steps, one sample image: a few seconds on CPU."""
    return ["--output_dir", str(output_dir), "--max_train_samples", str(samples),
            "--max_train_steps", str(steps), "--expected_batch_size", str(batch),
            "--train_batch_size", str(batch), "--selection_batch_size", str(samples),
            "--num_validation_images", "1", "--validation_prompt", "An image of a Bag",
            "--checkpointing_steps", "1", *map(str, extra)]


def run(output_dir, *extra, **sizes) -> None:
    training_script().main(tiny_argv(output_dir, *extra, **sizes))


def work_dir(output_dir) -> Path:
    return Path(f"{output_dir}-work")


def ledger_steps(output_dir) -> dict[str, int]:
    """Recorded applications per mechanism name; {} if the ledger does not exist (nothing spent)."""
    path = work_dir(output_dir) / "ledger.json"
    if not path.exists():
        return {}
    steps: dict[str, int] = {}
    for stage in json.loads(path.read_text())["stages"]:
        steps[stage["name"]] = steps.get(stage["name"], 0) + stage["steps"]
    return steps
