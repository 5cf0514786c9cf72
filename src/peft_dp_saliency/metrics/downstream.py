"""Downstream accuracy (DPImageBench protocol): train on synthetic, select on synthetic, test on real.

A classifier is trained on the synthetic set minus a stratified held-out part; the epoch with the
best accuracy on that held-out SYNTHETIC part is kept (real data never selects anything), and its
accuracy on the real test split is reported.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy
from tqdm.auto import tqdm

from .image_sets import LabelledImages


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al., 2016, sec. 4.2): 16/32/64 channels, n blocks each.

    Input float (B, 3, H, W) in [-1, 1] of any size (global average pooling); output logits (B, K).
    resnet8 (n=1, 78k parameters) is the default, sized for 2 CPU cores; resnet20 is the paper's.
    """

    def __init__(self, depth: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride=2 if stage > 0 and block == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def build_classifier(name: str, num_classes: int) -> nn.Module:
    """A classifier by name: "resnet<depth>" with depth = 6n+2 (resnet8, resnet14, resnet20, ...)."""
    match = re.fullmatch(r"resnet(\d+)", name)
    if match is None:
        raise ValueError(f"unknown classifier {name!r}; use resnet<6n+2>, e.g. resnet8 or resnet20")
    return CifarResNet(int(match.group(1)), num_classes)


def stratified_split(labels: torch.Tensor, fraction: float, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices; each class with n >= 2 items gives max(1, round(fraction n)) of them."""
    train, held_out = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        held_out.append(members[:count])
        train.append(members[count:])
    return torch.cat(train), torch.cat(held_out)


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, H, W) shifted by up to max(1, H // 8) pixels per axis (reflection padding)."""
    n, _, height, width = images.shape
    pad = max(1, height // 8)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, n), generator=generator)).to(images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indexing puts C last


def _as_input(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] on `device`."""
    return images.to(device).float() / 127.5 - 1.0


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512, device="cpu") -> torch.Tensor:
    """(N,) predicted class indices of `model` for uint8 images (N, 3, H, W)."""
    model.eval()
    return torch.cat([model(_as_input(images[start:start + batch_size], device)).argmax(1).cpu()
                      for start in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512,
             device="cpu") -> float:
    """Top-1 accuracy of `model` on uint8 images (N, 3, H, W) with labels (N,)."""
    return (predict(model, images, batch_size, device) == labels).sum().item() / len(images)


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     held_out: tuple[torch.Tensor, torch.Tensor], epochs: int = 10, batch_size: int = 128,
                     lr: float = 2e-3, augment: bool = True, seed: int = 0, device="cpu",
                     show_progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Train with AdamW + cosine decay; return the model of the best held-out epoch and every
    epoch's held-out accuracy. images: uint8 (N, 3, H, W), labels: (N,); held_out likewise."""
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    history, best_state = [], None
    for _ in tqdm(range(epochs), desc="training classifier", disable=not show_progress):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size]
            inputs = _as_input(images[batch], device)
            if augment:
                inputs = random_shift(inputs, generator)
            loss = F.cross_entropy(model(inputs), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        history.append(accuracy(model, *held_out, device=device))
        if history[-1] > max(history[:-1], default=-1.0):  # the first best epoch wins ties
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, history


def downstream_accuracy(synthetic: LabelledImages, real_test: LabelledImages, classifier: str = "resnet8",
                        epochs: int = 10, batch_size: int = 128, lr: float = 2e-3,
                        held_out_fraction: float = 0.1, augment: bool = True, seed: int = 0,
                        device="cpu", show_progress: bool = True) -> dict:
    """Accuracy on the real test split of a classifier trained and selected on the synthetic set.

    Both sets must share class indices (see `image_sets.align_classes`). Returns {"acc",
    "per_class_acc" ({real class name: accuracy on its test images}), "best_epoch" (1-based),
    "synthetic_held_out_acc" (per epoch), "num_synthetic_train", "num_synthetic_held_out", "classifier", "epochs"}.
    """
    generator = torch.Generator().manual_seed(seed)
    train, held_out = stratified_split(synthetic.labels, held_out_fraction, generator)
    if len(held_out) == 0:
        raise ValueError("every synthetic class needs at least 2 images (one is held out for selection)")
    torch.manual_seed(seed)  # classifier initialisation
    model = build_classifier(classifier, len(real_test.class_names))
    model, history = train_classifier(
        model, synthetic.images[train], synthetic.labels[train],
        (synthetic.images[held_out], synthetic.labels[held_out]), epochs=epochs, batch_size=batch_size,
        lr=lr, augment=augment, seed=seed, device=device, show_progress=show_progress)
    best = max(range(len(history)), key=history.__getitem__)
    predicted = predict(model, real_test.images, device=device)
    per_class = multiclass_accuracy(predicted, real_test.labels, num_classes=len(real_test.class_names),
                                    average=None)  # recall of each real class: which ones the synthetic set teaches
    return {"acc": (predicted == real_test.labels).sum().item() / len(predicted),
            "per_class_acc": dict(zip(real_test.class_names, per_class.tolist())),
            "best_epoch": best + 1, "synthetic_held_out_acc": history, "classifier": classifier,
            "epochs": epochs, "num_synthetic_train": len(train), "num_synthetic_held_out": len(held_out)}
