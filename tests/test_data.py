"""Sensitive image loading: Fashion-MNIST files, imagefolders, saved `datasets` datasets."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from peft_dp_saliency import data
from peft_dp_saliency.data import load_sensitive_dataset, resize_center_crop

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def fmnist_train():
    return load_sensitive_dataset()


def _image(mode: str, size=(8, 6), value=0) -> Image.Image:
    """A constant image of `mode` and `size` (W, H)."""
    return Image.new(mode, size, value)


@pytest.fixture
def folder(tmp_path):
    """root/bag (3 files), root/coat (2 files) plus hidden entries; R-independent sizes."""
    root = tmp_path / "images"
    (root / "bag").mkdir(parents=True)
    (root / "coat").mkdir()
    _image("L", (40, 20), 0).save(root / "bag" / "a_gray.png")
    _image("RGBA", (7, 9), (255, 255, 255, 0)).save(root / "bag" / "b_clear.png")
    palette = _image("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "bag" / "c_palette.png")
    Image.fromarray(np.full((10, 12), 65535, np.uint16)).save(root / "coat" / "d_16bit.png")
    Image.fromarray(np.full((5, 5), 257 * 100, np.int32)).save(root / "coat" / "e_int.tif")
    (root / "coat" / ".DS_Store").write_bytes(b"\x00junk")
    (root / ".hidden").mkdir()
    return root


def test_fashion_mnist_train_default(fmnist_train):
    ds = fmnist_train
    assert len(ds) == 60000 and ds.labels.shape == (60000,) and ds.labels.dtype == torch.int64
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (image[:, border] == -1).all()
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert ds.class_names[0] == "T-shirt" and ds.class_names[9] == "Ankle boot"
    assert ds.prompts[0] == "An image of a T-shirt" and len(ds.prompts) == 10
    assert "N=60000" in ds.description and "padded" in ds.description


def test_fashion_mnist_test_split_resolution_and_max_examples():
    ds = load_sensitive_dataset("fashion-mnist", split="test", resolution=64)
    assert len(ds) == 10000
    image, _ = ds[3]
    assert image.shape == (3, 64, 64) and (image[:, :3, :] == -1).all()
    small = load_sensitive_dataset(split="test", max_examples=5)
    assert len(small) == 5 and torch.equal(small.labels, ds.labels[:5])
    with pytest.raises(ValueError, match="split"):
        load_sensitive_dataset(split="dev")


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_sensitive_dataset()


def test_imagefolder_converts_every_mode_and_size(folder):
    ds = load_sensitive_dataset(str(folder), resolution=16)
    assert len(ds) == 5  # every file, hidden ones excluded, nothing dropped
    assert ds.class_names == ["bag", "coat"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.prompts == ["An image of a bag", "An image of a coat"]
    images = [ds[index][0] for index in range(len(ds))]
    assert all(image.shape == (3, 16, 16) for image in images)
    gray, clear, palette, white16, int_mode = images
    assert (gray == -1).all() and (clear == -1).all()  # black; transparent over black
    assert torch.allclose(palette[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert (white16 == 1).all()  # 65535 / 257 = 255
    assert torch.allclose(int_mode, torch.tensor(100 / 127.5 - 1))
    batch, labels = next(iter(DataLoader(ds, batch_size=5)))
    assert batch.shape == (5, 3, 16, 16) and labels.dtype == torch.int64


def test_resize_shorter_side_then_center_crop():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # white middle third
    out = resize_center_crop(Image.fromarray(wide), 10)
    assert out.size == (10, 10)
    assert (np.asarray(out)[:, 2:8] == 255).all()


def _truncated_png(path):
    _image("RGB", (32, 32), (10, 20, 30)).save(path)
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("breaker, needle", [
    (lambda root: _truncated_png(root / "bag" / "broken.png"), "broken.png"),
    (lambda root: (root / "coat" / "notes.txt").write_text("hello"), "notes.txt"),
    (lambda root: Image.fromarray(np.ones((4, 4), np.float32)).save(root / "coat" / "f.tif"),
     "f.tif"),
    (lambda root: (root / "readme.md").write_text("x"), "readme.md"),
    (lambda root: (root / "bag" / "nested").mkdir(), "nested"),
])
def test_imagefolder_bad_input_names_the_file(folder, breaker, needle):
    breaker(folder)
    with pytest.raises(ValueError, match=needle):
        load_sensitive_dataset(str(folder))


def test_imagefolder_lists_many_bad_files(folder):
    for index in range(25):
        (folder / "bag" / f"bad{index:02d}.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"(?s)25 of 30 images.*and 5 more.*Remove or fix") as info:
        load_sensitive_dataset(str(folder))
    assert "bad00.txt" in str(info.value)


def test_empty_and_missing_roots(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_sensitive_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="nowhere"):
        load_sensitive_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_sensitive_dataset(str(tmp_path / "file.png"))


def _tiny_dataset(labels, image_column="image", label_feature=None):
    images = [_image("L", (6 + i, 6), 255) for i in range(len(labels))]
    features = datasets.Features({image_column: datasets.Image(),
                                  "label": label_feature or datasets.ClassLabel(names=["x", "y"])})
    return datasets.Dataset.from_dict({image_column: images, "label": labels}, features=features)


def test_saved_dataset_loads(tmp_path):
    _tiny_dataset([0, 1, 1]).save_to_disk(tmp_path / "saved")
    ds = load_sensitive_dataset(str(tmp_path / "saved"), resolution=8)
    assert len(ds) == 3 and ds.class_names == ["x", "y"] and ds.labels.tolist() == [0, 1, 1]
    image, label = ds[2]
    assert image.shape == (3, 8, 8) and (image == 1).all() and label == 1
    datasets.DatasetDict(test=_tiny_dataset([1, 0], image_column="img")).save_to_disk(
        tmp_path / "dict")
    ds = load_sensitive_dataset(str(tmp_path / "dict"), split="test")  # "img" auto-detected
    assert ds.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="no split 'train'"):
        load_sensitive_dataset(str(tmp_path / "dict"))


def test_saved_dataset_plain_labels_need_the_public_class_list(tmp_path):
    _tiny_dataset(["dog", "cat", "dog"], label_feature=datasets.Value("string")).save_to_disk(
        tmp_path / "saved")
    with pytest.raises(ValueError, match="not a datasets.ClassLabel.*--class_names"):
        load_sensitive_dataset(str(tmp_path / "saved"))
    ds = load_sensitive_dataset(str(tmp_path / "saved"), class_names=["cat", "dog", "bird"])
    assert ds.class_names == ["cat", "dog", "bird"] and ds.labels.tolist() == [1, 0, 1]


def test_saved_dataset_bad_columns_and_labels(tmp_path):
    _tiny_dataset([0, 1]).rename_column("label", "fine_label").save_to_disk(tmp_path / "a")
    with pytest.raises(ValueError, match=r"'label'.*fine_label.*label_column"):
        load_sensitive_dataset(str(tmp_path / "a"))
    assert len(load_sensitive_dataset(str(tmp_path / "a"), label_column="fine_label")) == 2
    _tiny_dataset([0, -1]).save_to_disk(tmp_path / "b")
    with pytest.raises(ValueError, match=r"'label'.*rows \[1\]"):
        load_sensitive_dataset(str(tmp_path / "b"))


def test_prompt_overrides(folder):
    ds = load_sensitive_dataset(str(folder), prompt_template="a photo of a {}, studio light")
    assert ds.prompts == ["a photo of a bag, studio light", "a photo of a coat, studio light"]
    ds = load_sensitive_dataset(str(folder), prompts=["handbag", "winter coat"])
    assert ds.prompts == ["handbag", "winter coat"]
    with pytest.raises(ValueError, match="2 strings"):
        load_sensitive_dataset(str(folder), prompts=["only one"])
    with pytest.raises(ValueError, match="prompt_template"):
        load_sensitive_dataset(str(folder), prompt_template="no placeholder")


def test_the_fashion_mnist_validation_split_is_the_last_10000_training_images(fmnist_train):
    validation = load_sensitive_dataset(split="validation", max_examples=5)
    assert len(load_sensitive_dataset(split="validation")) == 10_000
    for index in range(5):
        assert torch.equal(validation[index][0], fmnist_train[50_000 + index][0])
    assert validation.labels.tolist() == fmnist_train.labels[50_000:50_005].tolist()
