"""Interop of the synthetic set: DPImageBench's gen.npz (write, read, evaluate), the base model read from
the adapter's own metadata, and the Hub dataset push with a DatasetCard quoting the guarantee (offline)."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import DatasetCard
from PIL import Image

from peft_dp_saliency import dataset_release, dpimagebench, hub, synthesis
from peft_dp_saliency.accounting import PrivacyReport
from peft_dp_saliency.metrics import load_synthetic
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH

datasets.disable_progress_bars()
CLASSES = ["T-shirt/top", "Trouser"]
PROMPTS = ["An image of a T-shirt", "An image of a trouser"]
# The Hub's size_categories values (huggingface.co/docs/hub/datasets-cards).
HUB_SIZE_CATEGORIES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B",
                       "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T"}


def synthesize_script():
    from peft_dp_saliency.commands import synthesize

    return synthesize


@pytest.fixture()
def pngs(tmp_path) -> dict[str, list[Path]]:
    """2 classes x 2 random 32x32 RGB PNGs with a black 2-pixel border (like padded Fashion-MNIST)."""
    rng = np.random.default_rng(0)
    paths = {}
    for c, name in enumerate(CLASSES):
        paths[name] = []
        for i in range(2):
            pixels = np.zeros((32, 32, 3), dtype=np.uint8)
            pixels[2:30, 2:30] = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
            path = synthesis.image_path(tmp_path, synthesis.class_folder_name(name), i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            paths[name].append(path)
    return paths


# gen.npz -----------------------------------------------------------------------------------------

def test_gen_npz_has_dpimagebench_layout(pngs, tmp_path):
    path = dpimagebench.write_gen_npz(pngs, tmp_path / "out", resolution=28, channels=1, fit="center_crop")
    assert path.name == "gen.npz"
    with np.load(path) as archive:
        assert sorted(archive.files) == ["x", "y"]
        x, y = archive["x"], archive["y"]
    assert x.dtype == np.float32 and x.shape == (4, 1, 28, 28)  # NCHW, DPImageBench's FMNIST C and R
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert y.dtype == np.int64 and y.tolist() == [0, 0, 1, 1]  # label c = c-th class of class_prompts.json
    grey = np.asarray(Image.open(pngs["Trouser"][1]).convert("L"))[2:30, 2:30]  # the crop undoes the padding
    np.testing.assert_array_equal(np.rint(x[3, 0] * 255).astype(np.uint8), grey)


def test_gen_npz_rgb_round_trip_and_resize(pngs, tmp_path):
    x, _ = dpimagebench.gen_arrays(pngs)
    assert x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(np.rint(x[1] * 255).astype(np.uint8).transpose(1, 2, 0),
                                  np.asarray(Image.open(pngs[CLASSES[0]][1])))
    assert dpimagebench.gen_arrays(pngs, resolution=16)[0].shape == (4, 3, 16, 16)


def test_read_gen_npz_accepts_nhwc_uint8_and_refuses_bad_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", x=images, y=np.array([0, 1, 1]))
    x, y = dpimagebench.read_gen_npz(tmp_path / "nhwc.npz")
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [0, 1, 1]
    np.savez(tmp_path / "range.npz", x=np.full((2, 3, 8, 8), 255.0, dtype=np.float32), y=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # 0..255 floats: the evaluator would be off by 255x
        dpimagebench.read_gen_npz(tmp_path / "range.npz")
    np.savez(tmp_path / "keys.npz", images=images, labels=y)
    with pytest.raises(ValueError, match="'x' and 'y'"):
        dpimagebench.read_gen_npz(tmp_path / "keys.npz")


def test_evaluation_reads_a_gen_npz_as_the_synthetic_set(pngs, tmp_path):
    path = dpimagebench.write_gen_npz(pngs, tmp_path / "gen.npz")
    images = load_synthetic(path, resolution=32, class_names=CLASSES)
    assert images.images.shape == (4, 3, 32, 32) and images.images.dtype == torch.uint8
    assert images.labels.tolist() == [0, 0, 1, 1] and images.class_names == CLASSES
    np.testing.assert_array_equal(images.images[2].permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(pngs[CLASSES[1]][0])))
    grey = dpimagebench.write_gen_npz(pngs, tmp_path / "grey.npz", 28, 1, "center_crop")
    assert load_synthetic(grey, resolution=32, class_names=CLASSES).images.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="class names"):
        load_synthetic(path)
    with pytest.raises(ValueError, match="no name"):
        load_synthetic(path, class_names=CLASSES[:1])


def test_evaluate_script_scores_a_gen_npz(pngs, tmp_path):
    from peft_dp_saliency.commands import evaluate

    real = datasets.Dataset.from_dict(
        {"image": [Image.open(p) for class_paths in pngs.values() for p in class_paths] * 2,
         "label": [0, 0, 1, 1] * 2},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}))
    real.save_to_disk(str(tmp_path / "real"))
    npz = dpimagebench.write_gen_npz(pngs, tmp_path / "gen.npz")
    results = evaluate.main(["--synthetic_dir", str(npz), "--real", str(tmp_path / "real"), "--output_json",
                           str(tmp_path / "results.json"), "--epochs", "1", "--feature_network", "random-cnn",
                           "--device", "cpu", "--nearest_k", "1", "--held_out_fraction", "0.5"])
    assert results["num_synthetic"] == 4 and results["num_real"] == 8
    assert results["fid"] < 1e-3  # the same images on both sides


# Base model from the adapter's metadata -----------------------------------------------------------

def test_base_model_is_read_from_the_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        hub.release_base_model(release)  # nothing recorded: never a silent default
    (release / "README.md").write_text("---\nbase_model: someone/sd-15\n---\n# card\n")
    assert hub.release_base_model(release) == "someone/sd-15"
    (release / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/other"}))
    assert hub.release_base_model(release) == "org/other"  # PEFT's own field first


@pytest.mark.parametrize("name", [hub.EMBEDDED_BASE_NAME, "weights"])  # this release's name, older releases'
def test_embedded_base_named_in_the_card_resolves_to_the_embedded_model(tmp_path, name):
    (tmp_path / "README.md").write_text(f"---\nlicense: other\n---\n# DP-SAPF adapter for "
                                        f"{hub.LOCAL_BASE.format(name)}\n")
    assert hub.release_base_model(tmp_path) == str(EMBEDDED_MODEL_PATH)


def test_card_names_the_embedded_base_so_it_can_be_found_again(tmp_path):
    assert hub.local_base_name(str(EMBEDDED_MODEL_PATH)) == hub.EMBEDDED_BASE_NAME
    assert hub.local_base_name(str(tmp_path / "my-sd")) == "my-sd"


def test_synthesize_exits_with_the_fix_when_the_local_base_is_missing(tmp_path, monkeypatch):
    release = tmp_path / "release"
    release.mkdir()
    (release / "README.md").write_text(f"# DP-SAPF adapter for {hub.LOCAL_BASE.format('my-sd-folder')}\n")
    (release / "class_prompts.json").write_text(json.dumps({"class_names": CLASSES, "prompts": PROMPTS}))
    script = synthesize_script()
    monkeypatch.setattr(script, "load_public_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="my-sd-folder.*--pretrained_model_name_or_path"):
        script.main(["--lora_dir", str(release), "--output_dir", str(tmp_path / "out")])


# Hub dataset ---------------------------------------------------------------------------------------

def _report(private=True) -> PrivacyReport:
    epsilon = {"rdp": 3.21, "pld": 2.98} if private else {"rdp": float("inf"), "pld": float("inf")}
    return PrivacyReport(dataset_size=100, delta=1e-5, epsilon=epsilon, stages=[], target_epsilon=3.0,
                         accountant="pld", budget_shares={}, private=private)


def _release(directory: Path, private=True) -> Path:
    """A LoRA release of the embedded model (zero-initialised B: the public model's outputs)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from peft_dp_saliency.public_model import load_public_pipeline

    directory.mkdir()
    pipe = load_public_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    (directory / "class_prompts.json").write_text(json.dumps({"class_names": CLASSES, "prompts": PROMPTS}))
    _report(private).save(str(directory / "privacy_report.json"))
    (directory / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# DP-SAPF adapter for "
                                         f"{hub.LOCAL_BASE.format(hub.EMBEDDED_BASE_NAME)}\n")
    return directory


class FakeHub:
    """Records the Hub calls of a push (offline): repo creation, card upload, dataset upload."""

    def __init__(self, monkeypatch, output_dir: Path, fail_create: Exception | None = None):
        self.calls, self.output_dir, self.fail_create = [], output_dir, fail_create
        monkeypatch.setattr(dataset_release, "create_repo", self.create_repo)
        monkeypatch.setattr(DatasetCard, "push_to_hub", lambda card, *a, **k: self.push_card(card, *a, **k))
        monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda data, *a, **k: self.push_dataset(data, *a, **k))

    def create_repo(self, repo_id, **kwargs):
        if self.fail_create:
            raise self.fail_create
        images = self.output_dir / synthesis.IMAGES_SUBDIR
        self.calls.append(("create", repo_id, kwargs, images.exists()))
        return type("Repo", (), {"repo_id": repo_id})()

    def push_card(self, card, repo_id, **kwargs):
        self.calls.append(("card", repo_id, kwargs, str(card)))

    def push_dataset(self, dataset, repo_id, **kwargs):
        self.calls.append(("dataset", repo_id, kwargs, dataset))


def _argv(release, output_dir, *extra):
    return ["--lora_dir", str(release), "--output_dir", str(output_dir), "--images_per_class", "2",
            "--batch_size", "2", "--num_inference_steps", "1", "--device", "cpu", *extra]


def test_push_creates_the_repo_first_and_uploads_a_valid_card_and_the_labelled_set(tmp_path, monkeypatch):
    release, output_dir = _release(tmp_path / "adapter"), tmp_path / "synthetic"
    fake = FakeHub(monkeypatch, output_dir)
    synthesize_script().main(_argv(release, output_dir, "--push_to_hub", "--hub_model_id", "someone/dp-set",
                                   "--adapter_repo_id", "someone/dp-adapter", "--output_format", "both"))
    (kind, repo, kwargs, images_existed), card_call, dataset_call = fake.calls
    assert (kind, repo, kwargs["repo_type"], images_existed) == ("create", "someone/dp-set", "dataset", False)
    assert card_call[0] == "card" and card_call[2]["repo_type"] == "dataset"
    assert dataset_call[0] == "dataset" and dataset_call[1] == "someone/dp-set"
    pushed = dataset_call[3]
    assert pushed.features["label"].names == CLASSES and len(pushed) == 4

    card = DatasetCard.load(output_dir / "README.md")  # the YAML parses into DatasetCardData
    assert card_call[3] == str(card)
    meta = card.data.to_dict()
    assert yaml.safe_load(str(card).split("---")[1]) == meta
    assert meta["license"] == "apache-2.0"  # the adapter card's
    assert meta["task_categories"] == ["image-classification"]
    assert {"differential-privacy", "synthetic"} <= set(meta["tags"])
    assert meta["size_categories"] == ["n<1K"] and set(meta["size_categories"]) <= HUB_SIZE_CATEGORIES
    for quoted in ("3.21 (RDP)", "2.98 (PLD)", "1e-05", "| accountant (calibration) | pld |", "zero-out",
                   "https://huggingface.co/someone/dp-adapter"):
        assert quoted in card.text
    assert str(tmp_path) not in str(card)  # no local path of this machine in what is pushed
    assert (output_dir / "gen.npz").is_file() and (output_dir / synthesis.IMAGES_SUBDIR).is_dir()


def test_push_fails_before_generating_with_a_bad_token(tmp_path, monkeypatch):
    release, output_dir = _release(tmp_path / "adapter"), tmp_path / "synthetic"
    FakeHub(monkeypatch, output_dir, fail_create=RuntimeError("401 Unauthorized"))
    script = synthesize_script()
    monkeypatch.setattr(script, "load_public_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="401"):
        script.main(_argv(release, output_dir, "--push_to_hub", "--hub_model_id", "someone/dp-set"))
    assert not output_dir.exists()


def test_push_refuses_an_adapter_without_a_guarantee(tmp_path, monkeypatch):
    release, output_dir = _release(tmp_path / "adapter", private=False), tmp_path / "synthetic"
    fake = FakeHub(monkeypatch, output_dir)
    with pytest.raises(SystemExit, match="no DP guarantee"):
        synthesize_script().main(_argv(release, output_dir, "--push_to_hub", "--hub_model_id", "someone/x"))
    assert fake.calls == []


def test_npz_only_output_keeps_the_npz_and_drops_the_pngs(tmp_path):
    release, output_dir = _release(tmp_path / "adapter"), tmp_path / "synthetic"
    synthesize_script().main(_argv(release, output_dir, "--output_format", "npz", "--npz_resolution", "28",
                                   "--npz_fit", "center_crop", "--npz_channels", "1"))
    with np.load(output_dir / "gen.npz") as archive:
        assert archive["x"].shape == (4, 1, 28, 28) and archive["y"].tolist() == [0, 0, 1, 1]
    assert not (output_dir / synthesis.IMAGES_SUBDIR).exists()
    assert json.loads((output_dir / "synthesis_config.json").read_text())["pretrained_model_name_or_path"] == \
        str(EMBEDDED_MODEL_PATH)  # the base came from the release's card


def test_size_categories():
    assert [dataset_release.size_category(n) for n in (999, 1000, 60000, 10**6)] == \
        ["n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]
