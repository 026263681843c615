"""Decoder-only fine-tuning of the bundled small model on 10 annotated images of one kind.

The kind is the synthetic "phase" kind (phase-contrast-like cells: interior close to the
background, dark rim, bright halo), which the from-scratch training stream never draws.
Ten images (seeds 0-9) are the user's annotated images; ten others (seeds 100-109) are
held out. The point-prompt mean IoU (one positive point at the object's centroid, best of
three outputs, as in ``eval_small_model.py``) is measured on the held-out images before and
after fine-tuning, and the fine-tuning wall-clock time is reported (goal: at most 10 minutes
on 2 CPU cores).

    python experiments/finetune_check.py [--steps 300] [--out runs/finetune_phase]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import numpy as np
import torch

from napari_sam import SamPredictor
from napari_sam.checkpoints import build_sam
from napari_sam.training.synthetic import synthetic_image
from napari_sam.training.trainer import AnnotatedImages, TrainConfig, train

# sibling scripts in experiments/ (importable when this file is run as a script)
from eval_small_model import evaluate_image


def phase_images(seeds: range) -> list:
    return [synthetic_image(np.random.default_rng([2024, s]), shape=(256, 256), kind="phase") for s in seeds]


def point_iou(model, samples) -> float:
    predictor = SamPredictor(model)
    values = [v for s in samples for v in evaluate_image(predictor, s.image, s.labels)["point"]]
    return float(np.mean(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="model to fine-tune (default: bundled vit_small)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/finetune_phase")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, heldout = phase_images(range(10)), phase_images(range(100, 110))
    model = build_sam(args.checkpoint or "vit_small", device="cpu")
    before = point_iou(model, heldout)
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run: the time below is one whole run
    config = TrainConfig(
        steps=args.steps, images_per_step=4, objects_per_image=10, iterations=2, lr=args.lr,
        warmup_steps=20, decoder_only=True, precision="fp32", seed=0, checkpoint_every=50,
    )
    data = AnnotatedImages([s.image for s in train_set], [s.labels for s in train_set], seed=0)
    started = time.perf_counter()
    train(model, data, config, args.out)
    minutes = (time.perf_counter() - started) / 60
    after = point_iou(model, heldout)
    print("\n| phase-contrast-like cells, 10 held-out images | point-prompt mean IoU |")
    print("|---|---|")
    print(f"| before fine-tuning | {before:.3f} |")
    print(f"| after decoder-only fine-tuning on 10 images ({args.steps} steps, {minutes:.1f} min) | {after:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
