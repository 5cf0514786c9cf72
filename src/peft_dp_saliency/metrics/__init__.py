"""Quality of a synthetic labelled dataset: Frechet distance, precision/recall, downstream accuracy."""

from .downstream import build_classifier, downstream_accuracy
from .evaluate import evaluate_synthetic
from .features import RandomCNNFeatures, extract_features, find_inception_weights, load_feature_network
from .fid import frechet_distance
from .image_sets import LabelledImages, align_classes, load_real, load_synthetic
from .precision_recall import precision_recall

__all__ = ["LabelledImages", "RandomCNNFeatures", "align_classes", "build_classifier", "downstream_accuracy",
           "evaluate_synthetic", "extract_features", "find_inception_weights", "frechet_distance",
           "load_feature_network", "load_real", "load_synthetic", "precision_recall"]
