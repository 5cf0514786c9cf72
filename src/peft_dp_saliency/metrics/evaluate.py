"""All metrics of a synthetic set against the real test split, in one feature space."""

from __future__ import annotations

from torch import nn

from .downstream import downstream_accuracy
from .features import extract_features
from .fid import frechet_distance
from .image_sets import LabelledImages, align_classes
from .precision_recall import precision_recall


def evaluate_synthetic(synthetic: LabelledImages, real: LabelledImages, feature_network: nn.Module,
                       nearest_k: int = 3, feature_batch_size: int = 256, device="cpu",
                       **classifier_options) -> dict:
    """{"acc", "fid", "fid_features", "precision", "recall", "nearest_k", "num_real",
    "num_synthetic", "downstream": {...}}; `classifier_options` go to `downstream_accuracy`.

    Raises ValueError if the synthetic classes differ from the real ones.
    """
    synthetic = align_classes(synthetic, real)
    real_features = extract_features(feature_network, real.images, feature_batch_size, device)
    synthetic_features = extract_features(feature_network, synthetic.images, feature_batch_size, device)
    downstream = downstream_accuracy(synthetic, real, device=device, **classifier_options)
    return {"acc": downstream["acc"], "fid": frechet_distance(real_features, synthetic_features),
            "fid_features": feature_network.name,
            **precision_recall(real_features, synthetic_features, k=nearest_k), "nearest_k": nearest_k,
            "num_real": len(real), "num_synthetic": len(synthetic), "downstream": downstream}
