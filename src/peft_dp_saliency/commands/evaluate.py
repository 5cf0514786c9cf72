"""Evaluate a synthetic labelled dataset against the real test split.

    python examples/evaluate.py --synthetic_dir runs/dp_sapf_synthetic --real fashion-mnist \
        --output_json runs/dp_sapf_synthetic/results.json

Reports the Frechet distance and k-NN precision/recall against the real test split in one feature
space (InceptionV3 pool3 when available locally, else the offline random-cnn-v1, named in
`fid_features`), and the DPImageBench downstream accuracy: a classifier trained on the synthetic
set, its epoch selected on held-out synthetic images, tested on the real test split (overall and per real
class: `downstream.per_class_acc`).
A DPImageBench gen.npz (`synthesize.py --output_format npz`, or any DPImageBench method's) is read
as the synthetic set, so the numbers compare with DPImageBench's own evaluator.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from peft_dp_saliency.metrics import evaluate_synthetic, load_feature_network, load_real, load_synthetic
from peft_dp_saliency.metrics.features import FEATURE_NETWORKS

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic_dir", type=Path, required=True,
                   help="examples/synthesize.py output, an imagefolder (root/<class>/...), a "
                        "saved dataset, or a DPImageBench gen.npz (its labels are the real set's).")
    p.add_argument("--real", default="fashion-mnist",
                   help="Real data source, as for training: fashion-mnist, a folder or a Hub name.")
    p.add_argument("--real_split", default="test",
                   help="test: the reported numbers; validation (Fashion-MNIST: the last 10,000 training images): "
                        "for choosing hyperparameters without reading the test split (train on <= 50,000 then).")
    p.add_argument("--resolution", type=int, default=32, help="Both sets are compared at R x R.")
    p.add_argument("--output_json", type=Path, required=True)
    p.add_argument("--feature_network", choices=FEATURE_NETWORKS, default="auto",
                   help="auto: InceptionV3 if its weights are on disk, else random-cnn (logged).")
    p.add_argument("--inception_weights", type=Path, default=None,
                   help="Local weights-inception-2015-12-05-6726825d.pth (never downloaded).")
    p.add_argument("--nearest_k", type=int, default=3, help="k of the precision/recall manifolds.")
    p.add_argument("--feature_batch_size", type=int, default=256)
    p.add_argument("--classifier", default="resnet8", help="resnet<6n+2>: resnet8, resnet20, ...")
    p.add_argument("--epochs", type=int, default=20,
                   help="Classifier epochs; the checkpoint is the best on the held-out synthetic images. 20 "
                        "(issue 12's protocol): at 10 the held-out pick on 100 images per class was the last "
                        "epoch, i.e. the classifier was still learning.")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--held_out_fraction", type=float, default=0.1,
                   help="Synthetic images per class held out to select the classifier's epoch.")
    p.add_argument("--no_augmentation", action="store_true", help="Disable random shifts.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    real = load_real(args.real, split=args.real_split, resolution=args.resolution)
    synthetic = load_synthetic(args.synthetic_dir, resolution=args.resolution, class_names=real.class_names)
    network = load_feature_network(args.feature_network, args.inception_weights)
    logger.info("%d real %s images, %d synthetic images, features %s", len(real), args.real_split,
                len(synthetic), network.name)

    results = evaluate_synthetic(
        synthetic, real, network, nearest_k=args.nearest_k, feature_batch_size=args.feature_batch_size,
        device=args.device, classifier=args.classifier, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, held_out_fraction=args.held_out_fraction, augment=not args.no_augmentation,
        seed=args.seed)
    results.update(synthetic_dir=str(args.synthetic_dir), real=args.real, real_split=args.real_split,
                   resolution=args.resolution)
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(results, indent=2))
    logger.info("acc %.4f, fid %.3f (%s), precision %.3f, recall %.3f -> %s", results["acc"],
                results["fid"], results["fid_features"], results["precision"], results["recall"],
                args.output_json)
    return results


if __name__ == "__main__":
    main()
