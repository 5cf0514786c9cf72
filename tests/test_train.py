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
                        "--validation_guidance_scale", "1", "--push_to_hub", "--hub_model_id", "someone/dp-sapf-test"])
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
    loda_files = {"loda_adapter.safetensors", "loda_config.json"}  # only in --adapter loda releases
    assert {p.name for p in out.iterdir()} == hub.PUBLISHABLE_FILES - loda_files
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


@pytest.mark.parametrize("pool", ["attn_qkv", "all_linear_conv"])
def test_no_lora_release_is_an_exact_full_rank_adapter(tmp_path, pool):
    out = tmp_path / "nolora"
    training_script().main(TINY + ["--output_dir", str(out), "--no_lora", "--target_epsilon", "inf",
                               "--selection_strategy", "random", "--candidate_pool", pool])
    pipe = load_public_pipeline()
    names = json.loads((out / "selection.json").read_text())["selected"]
    if pool == "all_linear_conv":  # 25 of 83 drawn, 33 of them convolutions: released as conv LoRA
        assert any(isinstance(pipe.unet.get_submodule(name), torch.nn.Conv2d) for name in names)
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


@pytest.mark.parametrize("pool", ["all_linear", "all_linear_conv"])
def test_lora_beyond_attention_trains_privately_and_reloads_whole_in_a_fresh_pipeline(tmp_path, pool):
    """Pools beyond attention end to end (all_linear_conv: the private query scores frozen convolutions, DP-SGD
    trains conv LoRA, lora_A kh x kw and lora_B 1 x 1): load_lora_weights restores every adapted module, the
    attention projections next to the others, and exactly the trained model."""
    out = tmp_path / pool
    training_script().main(TINY + ["--output_dir", str(out), "--target_epsilon", "8", "--candidate_pool", pool,
                                   "--selection_strategy", "all"])
    selection = json.loads((out / "selection.json").read_text())
    public = load_public_pipeline()
    kinds = {type(public.unet.get_submodule(n)) for n in selection["selected"]}
    assert kinds == ({torch.nn.Linear, torch.nn.Conv2d} if pool == "all_linear_conv" else {torch.nn.Linear})
    fresh = load_public_pipeline()
    fresh.load_lora_weights(str(out))
    assert [n for n in selection["selected"] if not hasattr(fresh.unet.get_submodule(n), "lora_A")] == []
    reference = unet_output(trained_pipe(out))
    torch.testing.assert_close(unet_output(fresh), reference, rtol=0, atol=1e-5)
    assert not torch.allclose(unet_output(public), reference)  # the adapter moved the model


def test_the_conv_pool_refuses_adapters_that_cannot_hold_convolutions_before_reading_data(tmp_path):
    for flags in (["--adapter", "loda"], ["--selection_unit", "entry"]):
        with pytest.raises(SystemExit, match="all_linear_conv holds convolutions"):
            training_script().main(TINY + ["--output_dir", str(tmp_path / "x"), "--candidate_pool",
                                           "all_linear_conv", *flags])
        assert not (tmp_path / "x").exists()


def test_release_loads_with_peft_entry_points_without_warnings(pushed_run, recwarn):
    import warnings

    from peft import LoraConfig, PeftConfig, PeftModel

    out, _ = pushed_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns on unexpected keys: none may be there
        peft_config = PeftConfig.from_pretrained(str(out))
        lora_config = LoraConfig.from_pretrained(str(out))
    assert type(lora_config) is LoraConfig and lora_config.r == 2 and lora_config.lora_alpha == 6
    assert peft_config.base_model_name_or_path is None  # a local base is never written as a path
    reference = unet_output(trained_pipe(out))
    pipe = load_public_pipeline()
    model = PeftModel.from_pretrained(pipe.unet, str(out))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(latents, torch.tensor([10, 500]), states).sample, reference,
                                   rtol=0, atol=1e-6)
    config = SaliencyLoraConfig.from_pretrained(out)  # the selection fields come back from selection.json
    assert config.selection_strategy == "saliency" and config.candidate_pool == "attn_qkv"


def test_model_card_metadata_is_valid_and_has_no_local_path(pushed_run):
    from huggingface_hub import ModelCard

    from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH

    out, _ = pushed_run
    card = ModelCard.load(out / "README.md")  # parses the YAML into ModelCardData (raises if invalid)
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-to-image" and data["library_name"] == "diffusers"
    assert data["license"] == "apache-2.0"  # the embedded base model's own card license, not hard-coded
    assert "base_model" not in data and "base_model_relation" not in data  # the base is a local folder
    assert data["widget"][0]["output"]["url"] == "samples.png"
    assert str(EMBEDDED_MODEL_PATH) not in card.text and "/tmp" not in card.text
    assert "zero-out" in card.text and "class names" in card.text.lower()


def test_samples_png_is_drawn_at_the_validation_guidance_scale_and_the_card_says_so(pushed_run):
    """samples.png shows what synthesis at --validation_guidance_scale (1 here; the library default is 4)
    would draw from the released adapter, so the card does not show images of another guidance."""
    import numpy as np
    from PIL import Image

    from peft_dp_saliency.families import detect_family
    from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH
    from peft_dp_saliency.sampling import prompt_grid

    out, _ = pushed_run
    pipe = load_public_pipeline()
    pipe.load_lora_weights(str(out))
    detect_family(EMBEDDED_MODEL_PATH).use_fast_sampler(pipe)
    prompts = json.loads((out / "class_prompts.json").read_text())["prompts"]
    released = np.asarray(Image.open(out / "samples.png").convert("RGB"), dtype=float)
    size = released.shape[1] // 2  # one column (--num_validation_images 1), enlarged 2x by prompt_grid

    def grid(scale):
        return np.asarray(prompt_grid(pipe, prompts, per_prompt=1, seed=0, guidance_scale=scale, height=size,
                                      width=size), dtype=float)

    assert np.abs(released - grid(1.0)).mean() < 1.0  # the same images, up to uint8 rounding
    assert np.abs(released - grid(4.0)).mean() > 5.0
    card = (out / "README.md").read_text()
    assert "Drawn at guidance_scale=1 " in card and "guidance_scale=1).images[0]" in card


def test_hub_base_license_and_ids_in_card_metadata():
    from peft_dp_saliency.hub import card_metadata

    data = card_metadata("stable-diffusion-v1-5/stable-diffusion-v1-5", ["An image of a cat"],
                         "creativeml-openrail-m", "uoft-cs/cifar10").to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["base_model_relation"] == "adapter" and data["datasets"] == ["uoft-cs/cifar10"]
    assert data["license"] == "creativeml-openrail-m"


def test_a_paid_selection_is_reused_and_counted(pushed_run, tmp_path, monkeypatch):
    out, _ = pushed_run
    script = training_script()
    monkeypatch.setattr(script, "select_target_modules", lambda *a, **k: pytest.fail("ran a second query"))
    reused = tmp_path / "reused"
    script.main(TINY + ["--output_dir", str(reused), "--selection_json", str(out / "selection.json"),
                        "--selection_ratio", "0.5", "--target_epsilon", "8"])
    paid = json.loads((out / "selection.json").read_text())
    selection = json.loads((reused / "selection.json").read_text())
    assert selection["scores"] == paid["scores"] and selection["ratio"] == 0.5
    top = sorted(paid["scores"], key=paid["scores"].get, reverse=True)[:round(0.5 * len(paid["units"]))]
    assert set(selection["selected"]) == {m for u in top for m in paid["units"][u]}
    report = PrivacyReport.load(str(reused / "privacy_report.json"))
    assert [s["name"] for s in report.stages] == ["selection", "dp_sgd"]
    assert report.stages[0]["noise_multiplier"] == paid["mechanism"]["noise_multiplier"]
    assert report.guarantee_epsilon <= 8.0


def test_a_paid_selection_with_another_score_is_refused_before_spending(pushed_run, tmp_path):
    """Its noisy scores were ranked by the query's score: a run naming another would misdescribe the selection."""
    out, _ = pushed_run
    script = training_script()
    reused = tmp_path / "reused"
    with pytest.raises(SystemExit, match="--saliency_score: query 'norm', run 'debiased'"):
        script.main(TINY + ["--output_dir", str(reused), "--selection_json", str(out / "selection.json"),
                            "--saliency_score", "debiased", "--target_epsilon", "8"])
    assert not (reused / "privacy_report.json").exists()


def test_fit_from_python_gives_the_same_artefacts_as_the_command(tmp_path, pushed_run):
    from peft_dp_saliency.train import fit

    with pytest.raises(TypeError, match="unknown training options"):
        fit(tmp_path / "x", max_grad_nrom=1.0)
    result = fit(output_dir=tmp_path / "api", max_train_samples=48, max_train_steps=3, expected_batch_size=16,
                 train_batch_size=8, selection_batch_size=24, num_validation_images=1, checkpointing_steps=2,
                 seed=0, rank=2, lora_alpha=6, target_epsilon=8)
    script_out, _ = pushed_run
    assert {p.name for p in result.output_dir.iterdir()} == {p.name for p in script_out.iterdir()}
    assert result.report.guarantee_epsilon <= 8 and result.selection.strategy == "saliency"
    pipe = load_public_pipeline()
    public = unet_output(pipe)
    result.load_into(pipe)
    assert not torch.allclose(unet_output(pipe), public)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("no_lora", [False, True])
def test_mixed_precision_runs_on_cpu_with_fp32_trainable_weights(tmp_path, precision, no_lora):
    out = tmp_path / "run"
    training_script().main(["--output_dir", str(out), "--max_train_samples", "16", "--max_train_steps", "2",
                            "--expected_batch_size", "8", "--train_batch_size", "8", "--selection_batch_size", "16",
                            "--num_validation_images", "1", "--validation_prompt", "An image of a Bag",
                            "--mixed_precision", precision, *(["--no_lora"] if no_lora else [])])
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert PrivacyReport.load(str(out / "privacy_report.json")).private
