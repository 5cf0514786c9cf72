"""End to end: examples/train_dp_sapf.py on a slice of Fashion-MNIST, then load the release."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_dp_saliency import hub
from peft_dp_saliency.accounting import PrivacyReport, compute_epsilon
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.public_model import load_public_pipeline
from script_runner import training_script

TINY = ["--max_train_samples", "48", "--max_train_steps", "3", "--expected_batch_size", "16",
        "--train_batch_size", "8", "--selection_batch_size", "24", "--num_validation_images", "1",
        "--checkpointing_steps", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """A private run with alpha != rank, pushed to a patched Hub."""
    out = tmp_path_factory.mktemp("run") / "out"
    script = training_script()
    calls = {}
    patch = pytest.MonkeyPatch()
    patch.setattr(hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and
                  type("Repo", (), {"repo_id": repo_id})())
    patch.setattr(hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    script.main(TINY + ["--output_dir", str(out), "--rank", "2", "--lora_alpha", "6", "--target_epsilon", "8",
                        "--push_to_hub", "--hub_model_id", "someone/dp-sapf-test"])
    patch.undo()
    return out, calls


def unet_output(pipe):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 500]), states).sample


def trained_pipe(run_dir: Path):
    """The model as training left it: adapter config + the last checkpoint's trainable tensors."""
    pipe = load_public_pipeline()
    config = SaliencyLoraConfig.from_pretrained(run_dir)
    pipe.unet.add_adapter(config)
    work = Path(f"{run_dir}-work")
    checkpoint = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    params = dict(pipe.unet.named_parameters())
    for name, value in load_file(str(checkpoint / "trainable.safetensors")).items():
        params[name].data.copy_(value)
    return pipe


def test_release_loads_with_load_lora_weights_exactly(pushed_run):
    out, _ = pushed_run
    reference = unet_output(trained_pipe(out))
    pipe = load_public_pipeline()
    public = unet_output(pipe)
    pipe.load_lora_weights(str(out))
    loaded = unet_output(pipe)
    assert not torch.allclose(loaded, public)  # the adapter changes the model
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-6)
    config = SaliencyLoraConfig.from_pretrained(out)
    assert config.r == 2 and config.lora_alpha == 6
    assert set(config.target_modules) == set(json.loads((out / "selection.json").read_text())["selected"])


def test_outputs_are_only_dp_outputs(pushed_run):
    out, _ = pushed_run
    assert {p.name for p in out.iterdir()} == hub.PUBLISHABLE_FILES
    text = " ".join(p.read_text(errors="ignore") for p in out.glob("*.json"))
    assert "loss" not in text and "norms" not in text
    (out / "train_loss.csv").write_text("step,loss\n1,0.3\n")
    with pytest.raises(RuntimeError, match="train_loss.csv"):
        hub.check_publishable(out)
    (out / "train_loss.csv").unlink()


def test_push_uploads_exactly_output_dir(pushed_run):
    out, calls = pushed_run
    assert calls["create"][0] == "someone/dp-sapf-test"
    assert calls["upload"]["folder_path"] == str(out) and calls["upload"]["repo_id"] == "someone/dp-sapf-test"
    card = (out / "README.md").read_text()
    assert "someone/dp-sapf-test" in card and "DP" in card


def test_report_counts_selection_and_every_step(pushed_run):
    out, _ = pushed_run
    report = PrivacyReport.load(out / "privacy_report.json")
    stages = {s["name"]: s for s in report.stages}
    assert stages["selection"]["steps"] == 1 and stages["dp_sgd"]["steps"] == 3
    assert stages["dp_sgd"]["sample_rate"] == pytest.approx(16 / 48)
    assert report.private and report.epsilon["pld"] <= 8.0 + 1e-9
    assert report.epsilon["pld"] == pytest.approx(compute_epsilon(report.stage_objects(), report.delta, "pld"))


def test_no_lora_release_is_an_exact_full_rank_adapter(tmp_path):
    out = tmp_path / "nolora"
    training_script().main(TINY + ["--output_dir", str(out), "--no_lora", "--target_epsilon", "inf",
                               "--selection_strategy", "random"])
    pipe = load_public_pipeline()
    names = json.loads((out / "selection.json").read_text())["selected"]
    work = sorted((tmp_path / "nolora-work").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    trained = load_file(str(work / "trainable.safetensors"))
    for name in names:
        pipe.unet.get_submodule(name).weight.data.copy_(trained[f"{name}.weight"])
    reference = unet_output(pipe)
    fresh = load_public_pipeline()
    fresh.load_lora_weights(str(out))
    torch.testing.assert_close(unet_output(fresh), reference, rtol=0, atol=1e-5)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["private"] is False and report["epsilon"]["pld"] == "inf"
