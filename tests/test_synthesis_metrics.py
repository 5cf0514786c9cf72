"""Synthetic dataset generation (layout, labels, determinism, resume) and its quality metrics."""

import importlib
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from peft_dp_saliency import synthesis
from peft_dp_saliency.data import load_sensitive_dataset
from peft_dp_saliency.metrics import (LabelledImages, RandomCNNFeatures, align_classes, downstream_accuracy,
                                      extract_features, find_inception_weights, frechet_distance,
                                      load_feature_network, load_synthetic, precision_recall)
from peft_dp_saliency.metrics.image_sets import from_dataset
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH, load_public_pipeline
from peft_dp_saliency.sampling import use_dpm_solver

datasets.disable_progress_bars()
CLASSES = ["T-shirt/top", "Trouser"]
PROMPTS = ["An image of a T-shirt", "An image of a trouser"]
SETTINGS = dict(images_per_class=3, seed=7, num_inference_steps=2, batch_size=2, show_progress=False)


def _script(name: str):
    """The command behind examples/<name>.py (peft_dp_saliency.commands.<name>)."""
    return importlib.import_module(f"peft_dp_saliency.commands.{name}")


def _pixels(paths: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for class_paths in paths.values() for path in class_paths]


class CountingPipe:
    """A pipeline proxy that records the batch size of every generation call."""

    def __init__(self, pipe):
        self.pipe, self.batch_sizes = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kwargs):
        self.batch_sizes.append(len(prompts))
        return self.pipe(prompts, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the cores are shared, and oversubscribed threads are much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_public_pipeline()
    use_dpm_solver(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def baseline(pipe, tmp_path_factory):
    """(output_dir, paths) of a public-model synthetic set: 2 classes x 3 images."""
    output_dir = tmp_path_factory.mktemp("baseline")
    return output_dir, synthesis.synthesize(pipe, CLASSES, PROMPTS, output_dir, **SETTINGS)


@pytest.fixture(scope="module")
def fmnist_test():
    return from_dataset(load_sensitive_dataset("fashion-mnist", split="test", max_examples=400))


# Synthesis ---------------------------------------------------------------------------------------

def test_synthesis_layout_and_labels(baseline):
    output_dir, paths = baseline
    assert sorted(p.name for p in (output_dir / "train").iterdir()) == ["T-shirt_top", "Trouser"]
    assert [p.name for p in paths["Trouser"]] == ["00000.png", "00001.png", "00002.png"]
    assert all(Image.open(p).size == (32, 32) and Image.open(p).mode == "RGB" for p in paths["Trouser"])
    assert synthesis.read_class_prompts(output_dir) == (CLASSES, PROMPTS)

    loaded = load_synthetic(output_dir)
    assert loaded.class_names == CLASSES
    assert loaded.images.shape == (6, 3, 32, 32) and loaded.images.dtype == torch.uint8
    assert loaded.labels.tolist() == [0, 0, 0, 1, 1, 1]

    dataset = synthesis.to_dataset(paths)
    assert dataset.features["label"].names == CLASSES and dataset["label"] == [0, 0, 0, 1, 1, 1]


def test_synthesis_is_deterministic_and_resumes_identically(pipe, baseline, tmp_path):
    _, reference = baseline
    paths = synthesis.synthesize(pipe, CLASSES, PROMPTS, tmp_path, **SETTINGS)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(paths), _pixels(reference)))
    assert not np.array_equal(_pixels(paths)[0], _pixels(paths)[1])  # each image has its own seed

    paths["T-shirt/top"][1].unlink()  # an interrupted run: one batch of class 0 and all of class 1 missing
    for path in paths["Trouser"]:
        path.unlink()
    counting = CountingPipe(pipe)
    resumed = synthesis.synthesize(counting, CLASSES, PROMPTS, tmp_path, **SETTINGS)
    assert counting.batch_sizes == [2, 2, 1]  # only batches with a missing file are generated
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(resumed), _pixels(reference)))

    with pytest.raises(ValueError, match="seed"):
        synthesis.synthesize(pipe, CLASSES, PROMPTS, tmp_path, **{**SETTINGS, "seed": 8})


def test_grayscale_mode_saves_the_luma_of_the_same_images(pipe, baseline, tmp_path):
    _, reference = baseline
    paths = synthesis.synthesize(pipe, CLASSES, PROMPTS, tmp_path, **SETTINGS, image_mode="L")
    for gray, rgb in zip(paths["Trouser"], reference["Trouser"]):
        assert Image.open(gray).mode == "L"
        assert np.array_equal(np.asarray(Image.open(gray)), np.asarray(Image.open(rgb).convert("L")))
    loaded = load_synthetic(tmp_path)  # read back as RGB with three equal channels, like the real images
    assert loaded.images.shape == (6, 3, 32, 32) and torch.equal(loaded.images[:, 0], loaded.images[:, 2])
    with pytest.raises(ValueError, match="image_mode"):  # resuming in another mode is refused
        synthesis.synthesize(pipe, CLASSES, PROMPTS, tmp_path, **SETTINGS)
    with pytest.raises(ValueError, match="image_mode must be one of"):
        synthesis.synthesize(pipe, CLASSES, PROMPTS, tmp_path / "other", **SETTINGS, image_mode="CMYK")


def _save_adapter(lora_dir: Path) -> None:
    """A random (non-zero) LoRA adapter on to_q/to_v with class prompts and a privacy report."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_public_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"],
                                     init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    StableDiffusionPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    (lora_dir / "class_prompts.json").write_text(json.dumps({"class_names": CLASSES, "prompts": PROMPTS}))
    _report(private=True).save(str(lora_dir / "privacy_report.json"))


def _report(private: bool):
    from peft_dp_saliency.accounting import PrivacyReport

    epsilon = {"rdp": 3.21, "pld": 2.98} if private else {"rdp": float("inf"), "pld": float("inf")}
    return PrivacyReport(dataset_size=100, delta=1e-5, epsilon=epsilon, stages=[], target_epsilon=3.0,
                         accountant="pld", budget_shares={}, private=private)


def test_synthesize_script_with_adapter(baseline, tmp_path):
    lora_dir, output_dir = tmp_path / "adapter", tmp_path / "synthetic"
    _save_adapter(lora_dir)
    _script("synthesize").main([
        "--lora_dir", str(lora_dir), "--output_dir", str(output_dir), "--images_per_class", "3",
        "--batch_size", "2", "--num_inference_steps", "2", "--seed", "7", "--save_dataset",
        "--device", "cpu", "--pretrained_model_name_or_path", str(EMBEDDED_MODEL_PATH)])  # it has no card

    paths = {name: [synthesis.image_path(output_dir, synthesis.class_folder_name(name), i) for i in range(3)]
             for name in CLASSES}
    adapted, public = _pixels(paths), _pixels(baseline[1])
    assert not any(np.array_equal(a, b) for a, b in zip(adapted, public))  # the adapter was applied
    assert Image.open(output_dir / "preview_grid.png").size == (3 * 64, 2 * 64)  # a row per class, x2
    card = (output_dir / "README.md").read_text()
    assert "(epsilon = 3.21 (RDP accountant), epsilon = 2.98 (PLD accountant), delta = 1e-05)-DP" in card
    saved = datasets.load_from_disk(str(output_dir / "dataset"))
    assert saved.features["label"].names == CLASSES and len(saved) == 6
    assert np.array_equal(np.asarray(saved[3]["image"]), adapted[3])


def test_privacy_statement_never_claims_too_much():
    assert "epsilon = 0" in synthesis.privacy_statement(None, None)
    assert "no privacy guarantee" in synthesis.privacy_statement("adapter", None)
    assert "WITHOUT" in synthesis.privacy_statement("adapter", _report(private=False))


# Metrics -----------------------------------------------------------------------------------------

def test_frechet_distance_matches_the_gaussian_closed_form():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=generator) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.randn(20000, 4, generator=generator) * torch.tensor([2.0, 2.0, 1.0, 4.0]) + torch.tensor(
        [1.0, 0.0, 0.0, 2.0])
    # |mu_a - mu_b|^2 + sum (s_a - s_b)^2 = 5 + 1 + 0 + 4 + 0
    assert frechet_distance(a, b) == pytest.approx(10.0, rel=0.05)


def test_metrics_move_the_right_way(fmnist_test):
    network = RandomCNNFeatures(seed=0)
    half, other_half = (extract_features(network, images) for images in fmnist_test.images.split(200))
    noise = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    noise_features = extract_features(network, noise)

    assert frechet_distance(half, other_half) < 0.05 * frechet_distance(half, noise_features)
    assert precision_recall(half, half) == {"precision": 1.0, "recall": 1.0}
    assert min(precision_recall(half, other_half, k=3).values()) > 0.8
    assert max(precision_recall(half, noise_features, k=3).values()) < 0.1


def test_feature_network_fallback_is_named_and_never_downloads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert find_inception_weights() is None
    with caplog.at_level(logging.WARNING):
        network = load_feature_network("auto")
    assert network.name == "random-cnn-v1@seed0" and "InceptionV3 is not available" in caplog.text
    with pytest.raises(RuntimeError, match="InceptionV3"):
        load_feature_network("inception")
    with pytest.raises(FileNotFoundError):
        find_inception_weights(tmp_path / "missing.pth")
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.touch()
    assert find_inception_weights() == cached

    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    assert torch.equal(network(images), RandomCNNFeatures(seed=0)(images))
    assert network(images).shape == (3, 480)
    assert not torch.equal(network(images), RandomCNNFeatures(seed=1)(images))


def test_classifier_on_real_images_beats_chance_by_far(fmnist_test):
    train = from_dataset(load_sensitive_dataset("fashion-mnist", split="train", max_examples=4000))
    result = downstream_accuracy(train, fmnist_test, epochs=1, batch_size=32, show_progress=False)
    assert result["acc"] > 0.6
    assert result["num_synthetic_held_out"] == 400 and result["best_epoch"] == 1
    per_class = result["per_class_acc"]  # recall per real class; its support-weighted mean is the accuracy
    assert list(per_class) == fmnist_test.class_names
    support = torch.bincount(fmnist_test.labels, minlength=len(per_class)).double()
    weighted = sum(a * n for a, n in zip(per_class.values(), support.tolist())) / support.sum()
    assert weighted == pytest.approx(result["acc"])


def test_label_set_mismatch_raises_and_an_empty_class_loads(baseline, tmp_path):
    synthetic = load_synthetic(baseline[0])
    real = LabelledImages(synthetic.images, synthetic.labels, ["T-shirt/top", "Bag"])
    with pytest.raises(ValueError, match=r"missing: \['Bag'\], unknown: \['Trouser'\]"):
        align_classes(synthetic, real)
    reordered = LabelledImages(synthetic.images, 1 - synthetic.labels, ["Trouser", "T-shirt/top"])
    assert align_classes(synthetic, reordered).labels.tolist() == [1, 1, 1, 0, 0, 0]

    root = tmp_path / "imagefolder"
    (root / "Bag").mkdir(parents=True)
    (root / "Coat").mkdir()
    Image.new("RGB", (32, 32)).save(root / "Bag" / "00000.png")
    empty_class = load_synthetic(root)  # an empty class folder is a class (class lists are public)
    assert empty_class.class_names == ["Bag", "Coat"] and empty_class.labels.tolist() == [0]


def test_evaluate_script_writes_results(baseline, fmnist_test, tmp_path):
    keep = fmnist_test.labels < 2  # real classes 0 and 1, named as the synthetic ones
    real = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in fmnist_test.images[keep]],
         "label": fmnist_test.labels[keep].tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}))
    real.save_to_disk(str(tmp_path / "real"))
    output_json = tmp_path / "results.json"
    _script("evaluate").main([
        "--synthetic_dir", str(baseline[0]), "--real", str(tmp_path / "real"), "--output_json",
        str(output_json), "--epochs", "1", "--feature_network", "random-cnn", "--device", "cpu"])

    results = json.loads(output_json.read_text())
    assert results["fid_features"] == "random-cnn-v1@seed0"
    assert results["num_real"] == int(keep.sum()) and results["num_synthetic"] == 6
    assert 0.0 <= results["acc"] <= 1.0 and results["fid"] > 0
    assert 0.0 <= results["precision"] <= 1.0 and 0.0 <= results["recall"] <= 1.0
