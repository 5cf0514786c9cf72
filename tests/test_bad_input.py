"""Bad input everywhere a user can reach: a clear error before any budget is spent, no leftovers.

Each case runs the training script's main(argv) in-process and checks the message, that the
spending ledger does not exist, and that no output folder (or only an empty pre-existing one)
is left behind. docs/robustness.md lists the same cases with what the user sees.
"""

import errno
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from diffusers import UNet2DConditionModel
from PIL import Image

from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH
from script_runner import ledger_steps, run, work_dir

pytestmark = pytest.mark.timeout(300)


def fails_cleanly(out: Path, *argv, match: str, samples=24, batch=8) -> str:
    """Run the script, expect SystemExit matching `match`; nothing spent, nothing left behind."""
    with pytest.raises(SystemExit, match=match) as error:
        run(out, *argv, samples=samples, batch=batch)
    assert ledger_steps(out) == {}
    assert not (work_dir(out) / "ledger.json").exists()
    for folder in (out, work_dir(out)):
        assert not folder.exists() or not any(folder.iterdir()), f"{folder} was left with files"
    return str(error.value)


@pytest.mark.parametrize("argv, match", [
    (["--target_epsilon", "-1"], r"^invalid arguments: --target_epsilon must be > 0"),
    (["--target_epsilon", "0"], r"^invalid arguments: --target_epsilon must be > 0"),
    (["--target_epsilon", "nan"], r"^invalid arguments: --target_epsilon must be > 0"),
    (["--target_delta", "1.5"], r"--target_delta must be in \(0, 1\)"),
    (["--selection_ratio", "0"], r"--selection_ratio must be in \(0, 1\], got 0.0"),
    (["--selection_ratio", "1.5"], r"--selection_ratio must be in \(0, 1\], got 1.5"),
    (["--max_train_samples", "1"], r"--max_train_samples must be >= 2"),
    (["--max_grad_norm", "0"], r"--max_grad_norm must be > 0"),
    (["--pretrained_model_name_or_path", "/nonexistent/model"], r"does not exist"),
])
def test_argument_errors_need_no_data(tmp_path, argv, match):
    fails_cleanly(tmp_path / "out", *argv, match=match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, match", [
    (["--target_delta", "0.05"], r"^--target_delta: delta=0.05 >= 1/N = 0.0416667 for N=24"),
    (["--expected_batch_size", "25"], r"^--expected_batch_size 25 exceeds the dataset size 24"),
    (["--target_epsilon", "0.05", "--selection_noise_multiplier", "5", "--selection_sample_rate", "1"],
     r"^--target_epsilon: Privacy budget cannot be met"),
])
def test_errors_that_need_the_dataset_size(tmp_path, argv, match):
    fails_cleanly(tmp_path / "out", *argv, match=match)
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


def test_pre_existing_empty_output_dir_is_kept_and_stays_empty(tmp_path):
    (tmp_path / "out").mkdir()
    fails_cleanly(tmp_path / "out", "--target_delta", "0.05", match="target_delta")
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())


def test_unknown_candidate_pool_is_rejected_by_the_parser(tmp_path, capsys):
    fails_cleanly(tmp_path / "out", "--candidate_pool", "mlp", match="2")
    # HfArgumentParser names the flag with its hyphenated alias: "argument --candidate_pool/--candidate-pool"
    assert re.search(r"argument --candidate_pool(/--candidate-pool)?: invalid choice: 'mlp'", capsys.readouterr().err)


@pytest.fixture(scope="module")
def model_without_attention(tmp_path_factory) -> Path:
    """The embedded pipeline with its UNet replaced by one that has no attention layer at all."""
    root = tmp_path_factory.mktemp("no-attention")
    for entry in EMBEDDED_MODEL_PATH.iterdir():
        if entry.name != "unet":
            (root / entry.name).symlink_to(entry)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=128, norm_num_groups=8,
    ).save_pretrained(root / "unet")
    return root


def test_model_without_attention_layers(tmp_path, model_without_attention):
    fails_cleanly(tmp_path / "out", "--pretrained_model_name_or_path", model_without_attention,
                  match=r"^--candidate_pool: UNet2DConditionModel has no candidate matrices for pool 'attn_qkv'")


def test_folder_that_is_not_a_stable_diffusion_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    fails_cleanly(tmp_path / "out", "--pretrained_model_name_or_path", tmp_path / "model",
                  match=r"is not a diffusers Stable Diffusion folder \(missing model_index.json")


def test_corrupt_images(tmp_path):
    root = tmp_path / "images"
    for name in ("bag", "coat"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    good = (root / "bag" / "0.png").read_bytes()
    (root / "coat" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "coat" / "2.png").write_bytes(b"this is not a png")
    message = fails_cleanly(tmp_path / "out", "--train_data_dir", root, match=(
        r"^cannot load the sensitive dataset: 2 of 5 images cannot be used"), samples=5, batch=2)
    assert "coat/1.png" in message and "coat/2.png: not an image file" in message


def make_read_only(folder: Path) -> None:
    """Read-only even for root (immutable attribute); skip if the filesystem cannot do it."""
    folder.mkdir()
    if os.geteuid() == 0:
        result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot make a folder read-only as root here: {result.stderr.decode()}")
    else:
        folder.chmod(0o555)


def test_read_only_output_dir(tmp_path):
    out = tmp_path / "out"
    make_read_only(out)
    try:
        fails_cleanly(out, match=r"^.*/out is not writable \((Operation not permitted|Permission denied)\)")
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        out.chmod(0o755)
    assert not work_dir(out).exists()  # the work folder this run had created is gone again


def test_disk_full_while_saving_releases_nothing_and_resume_writes_without_spending(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save_file = safetensors.torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as file:
            file.write(b"\x00" * 100)  # half-written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # what diffusers' LoRA writer calls
    with pytest.raises(SystemExit, match=r"^could not write the outputs to .*: \[Errno 28\] No space left"):
        run(out, "--max_train_steps", 1)
    spent = ledger_steps(out)
    assert spent == {"selection": 1, "dp_sgd": 1}  # the budget was spent: the ledger says so
    assert list(out.iterdir()) == []  # no half-written safetensors, no staging folder, nothing

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    run(out, "--max_train_steps", 1, "--resume_from_checkpoint", "latest")
    assert ledger_steps(out) == spent  # the release after the fix costs nothing
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "class_prompts.json",
        "privacy_report.json", "pytorch_lora_weights.safetensors", "samples.png", "selection.json"]


@pytest.mark.parametrize("argv, match", [
    (["--pretrained_model_name_or_path", "someone/some-model"], "cannot load the model someone/some-model"),
    (["--dataset_name", "someone/some-dataset"], "cannot load the sensitive dataset"),
])
def test_hub_ids_offline_fail_cleanly_in_a_real_process(tmp_path, argv, match):
    """The Hub code paths (from_pretrained, load_dataset) with HF_HUB_OFFLINE=1, as a user without a
    network would hit them: a clear message on stderr, exit status 1, nothing spent or written."""
    import sys

    from script_runner import SCRIPT, tiny_argv

    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *tiny_argv(out, *argv)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 1 and match in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert ledger_steps(out) == {} and not out.exists() and not work_dir(out).exists()
