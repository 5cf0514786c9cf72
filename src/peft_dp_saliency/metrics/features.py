"""Feature networks for Frechet distance and precision/recall, and batched feature extraction.

Every network takes uint8 RGB images (B, 3, H, W) of any size and returns float features (B, D);
its `name` is reported with every number computed in its feature space (`fid_features`).

- InceptionV3 pool3 (D = 2048, name "inception-v3-2015-12-05/pool3"): the standard FID network,
  through torchmetrics' `NoTrainInceptionV3` (torch-fidelity's port of the TF graph, inputs resized
  to 299 with TF1-style bilinear interpolation). Used only when torch-fidelity imports and the
  weights file is on disk: `inception_weights`, or torch hub's cache
  (`torch.hub.get_dir()/checkpoints/`) where torch-fidelity / torchmetrics store
  `weights-inception-2015-12-05-6726825d.pth` and pytorch-fid stores the same weights as
  `pt_inception-2015-12-05-6726825d.pth`. Nothing is ever downloaded.
- "random-cnn-v1@seed<s>" (D = 480): the documented offline fallback, a fixed randomly initialised
  CNN (random embeddings are a useful data-independent feature space: Naeem et al., 2020). Numbers
  in this space are comparable with each other, not with published FIDs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

INCEPTION_WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FEATURE_NETWORKS = ("auto", "inception", "random-cnn")


class RandomCNNFeatures(nn.Module):
    """random-cnn-v1: a fixed, seeded, randomly initialised CNN (data-independent).

    Input uint8 (B, 3, H, W), resized to 32x32 (bilinear, antialiased when shrinking) and scaled to [-1, 1].
    Four stages of conv3x3 (padding 1, no bias) -> ReLU -> 2x2 average pooling with 32, 64, 128
    and 256 channels. Conv weights ~ N(0, 2 / fan_in), drawn stage by stage from
    `torch.Generator().manual_seed(seed)` on the CPU in float32. Output (B, 480): the spatial mean
    of every channel of every stage, concatenated (low- and high-level statistics alike).
    """

    version = "random-cnn-v1"
    input_size = 32
    widths = (32, 64, 128, 256)

    def __init__(self, seed: int = 0):
        super().__init__()
        self.name = f"{self.version}@seed{seed}"
        generator = torch.Generator().manual_seed(seed)
        convs, channels = [], 3
        for width in self.widths:
            conv = nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False)
            fan_in = channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
            convs.append(conv)
            channels = width
        self.convs = nn.ModuleList(convs).requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.convs[0].weight.dtype)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False, antialias=True) / 127.5 - 1.0
        features = []
        for conv in self.convs:
            x = F.avg_pool2d(F.relu(conv(x)), 2)
            features.append(x.mean(dim=(2, 3)))
        return torch.cat(features, dim=1)


class InceptionV3Features(nn.Module):
    """InceptionV3 pool3 features (B, 2048) of uint8 images (B, 3, H, W), via torchmetrics."""

    name = "inception-v3-2015-12-05/pool3"

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(weights_path),
                                          antialias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def find_inception_weights(path: str | Path | None = None) -> Path | None:
    """The local InceptionV3 FID weights: `path` (must exist) or the first file in torch hub's cache."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"InceptionV3 weights {path} not found")
        return Path(path)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return next((cache / name for name in INCEPTION_WEIGHT_FILES if (cache / name).is_file()), None)


def _inception_unavailable(weights: Path | None) -> str | None:
    """Why InceptionV3 cannot be used here, or None if it can."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' InceptionV3 is torch-fidelity's)
    except ImportError as err:
        return f"torch-fidelity is not importable ({err}); `pip install torch-fidelity`"
    if weights is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        return (f"no weights file {' or '.join(INCEPTION_WEIGHT_FILES)} in {cache} and no "
                f"--inception_weights (never downloaded here; get it from {INCEPTION_URL})")
    return None


def load_feature_network(name: str = "auto", inception_weights: str | Path | None = None,
                         seed: int = 0) -> nn.Module:
    """The feature network `name` ("auto" | "inception" | "random-cnn"), in eval mode on the CPU.

    "auto" is InceptionV3 when it is available locally, else the random CNN (logged with the
    reason); "inception" raises instead of falling back. `seed` seeds the random CNN.
    """
    if name not in FEATURE_NETWORKS:
        raise ValueError(f"feature network must be one of {FEATURE_NETWORKS}, got {name!r}")
    if name != "random-cnn":
        weights = find_inception_weights(inception_weights)
        reason = _inception_unavailable(weights)
        if reason is None:
            return InceptionV3Features(weights).eval()
        if name == "inception":
            raise RuntimeError(f"InceptionV3 is not available: {reason}")
    network = RandomCNNFeatures(seed).eval()
    if name == "auto":
        logger.warning("InceptionV3 is not available (%s); using the offline feature space %s: its "
                       "numbers are not comparable with published FIDs", reason, network.name)
    return network


@torch.no_grad()
def extract_features(network: nn.Module, images: torch.Tensor, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, D) float64 CPU features of uint8 images (N, 3, H, W), computed in batches on `device`."""
    network = network.to(device)
    features = [network(images[start:start + batch_size].to(device)).double().cpu()
                for start in range(0, len(images), batch_size)]
    return torch.cat(features)
