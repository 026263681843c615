"""Why the bundled ``vit_small`` misses the synthetic quality goals: seven checks.

Each check runs on held-out synthetic images of the kind the goals describe (stars,
crescents and ellipses that touch, ``heldout_set(..., occlusion=False)``), never on the
evaluation set (seed offset 0) of ``eval_small_model.py``:

* ``ceiling``: a classical box-prompted segmentation with an oracle threshold, an upper
  bound of what intensity alone gives on these images. Inside each object's tight box, the
  image (grayscale mean of ``to_rgb_uint8``, Gaussian sigma 1 px) is thresholded at the
  one of 40 quantiles and polarity that scores best against the ground truth; the component
  holding the object's innermost pixel is kept and its holes filled. Second held-out set
  (seed offset 1), 30 images.
* ``box-margin``: the model's box IoU when the tight box is grown (or shrunk) by d px on
  every side: whether the model reads the box edges or the image. Second held-out set, 15
  images.
* ``errors``: where the model's box-prompt masks are wrong, as shares of the summed
  union of prediction and ground truth over all objects: false positives within 2 px of
  the object's boundary (the ring between the mask dilated and eroded by 2 px), on other
  objects, and elsewhere on the background; false negatives in the ring and further
  inside. Second held-out set, 20 images.
* ``overfit``: the model trained further on 16 images alone (seed offset 5; the full
  model, the recipe's prompts, learning rate 3e-4, 250 steps), scored on those same 16
  images before and after: how far the architecture fits images it sees again and again.
* ``memorise``: the same question without the things that slow fitting down: 4 images
  (seed offset 5, so every step sees all four), no augmentation, fp32, learning rate 3e-4
  with cosine decay over 300 steps, no weight decay, the recipe's prompts. Scored on those
  4 images and on 20 unseen images of the second held-out set before, after 150 and after
  300 steps: whether 8 px tokens can draw boundaries as exact as the goals need at all
  (the seen images), and how much of that carries over (the unseen ones).
* ``eval-like``: the model trained further on images drawn like the goal's (kind
  "shapes" with stars, crescents and ellipses only, 30 % with occlusion, the recipe's
  phase-3 prompts, learning rate 1e-4, 300 steps), written to ``runs/eval_like/model.pth``
  for ``eval_small_model.py --validation --amg-images 0 --checkpoint runs/eval_like/model.pth``;
* ``iou-head``: the recipe's phase 4 (IoU-head calibration on automatic-mask prompts) run
  for 300 more steps from the model, on a fresh stream (seed 11), written to
  ``runs/iou_head/model.pth`` for ``eval_small_model.py --sweep-amg 10 --checkpoint ...``:
  whether longer calibration ranks the automatic masks better.

Usage::

    python experiments/capacity_check.py ceiling|box-margin|errors|overfit|memorise|eval-like|iou-head [--checkpoint PATH]

``ceiling`` takes under a minute, ``box-margin`` and ``errors`` a minute each, ``overfit`` about 10 minutes,
``memorise`` about 12 minutes, ``eval-like`` about 11 minutes and ``iou-head`` about 9 minutes on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_sam import SamPredictor
from napari_sam.checkpoints import build_sam
from napari_sam.training.synthetic import heldout_set
from napari_sam.training.trainer import (
    AnnotatedImages, StepFunctions, SyntheticData, TrainConfig, optimization_step, train,
)
from napari_sam.utils.image import to_rgb_uint8

# sibling scripts in experiments/ (importable when this file is run as a script)
from eval_small_model import evaluate_images, ground_truth_objects, iou, tight_box
from train_small_model import PHASES

BOX_MARGINS = (-4, -2, 0, 2, 4, 8)
SIZE_BINS = ((25, 300), (300, 1000), (1000, 3000), (3000, 10**6))


def oracle_threshold_iou(gray: np.ndarray, mask: np.ndarray) -> float:
    """Best IoU of a thresholded box crop (see the module docstring) with ``mask``."""
    ys, xs = np.nonzero(mask)
    crop = gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    target = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    inner = np.unravel_index(int(np.argmax(ndimage.distance_transform_edt(target))), target.shape)
    best = 0.0
    for threshold in np.unique(np.quantile(crop, np.linspace(0.02, 0.98, 40))):
        for foreground in (crop > threshold, crop < threshold):
            components, _ = ndimage.label(foreground)
            if components[inner] == 0:
                continue
            found = ndimage.binary_fill_holes(components == components[inner])
            best = max(best, iou(found, target))
    return best


def ceiling() -> None:
    scores, areas = [], []
    for sample in heldout_set(30, seed=1, occlusion=False):
        gray = ndimage.gaussian_filter(to_rgb_uint8(sample.image).astype(np.float32).mean(-1), 1.0)
        for mask in ground_truth_objects(sample.labels):
            scores.append(oracle_threshold_iou(gray, mask))
            areas.append(mask.sum())
    scores, areas = np.array(scores), np.array(areas)
    print(f"box + oracle threshold: mean IoU {scores.mean():.3f} over {len(scores)} objects")
    for low, high in SIZE_BINS:
        inside = (areas >= low) & (areas < high)
        print(f"  {low}-{high} px: {scores[inside].mean():.3f} ({inside.sum()})")


def box_margin(checkpoint: str) -> None:
    predictor = SamPredictor(build_sam(checkpoint, device="cpu"))
    scores: dict[int, list[float]] = {d: [] for d in BOX_MARGINS}
    for sample in heldout_set(15, seed=1, occlusion=False):
        predictor.set_image(sample.image)
        for mask in ground_truth_objects(sample.labels):
            box = tight_box(mask)
            for d in BOX_MARGINS:
                masks, _, _ = predictor.predict(box=box + np.array([-d, -d, d, d], np.float32), multimask_output=False)
                scores[d].append(iou(masks[0], mask))
    print(f"box IoU by margin (px) on {len(scores[0])} objects: "
          + ", ".join(f"{d:+d}: {np.mean(v):.3f}" for d, v in scores.items()))


def errors(checkpoint: str) -> None:
    predictor = SamPredictor(build_sam(checkpoint, device="cpu"))
    kinds = ("false positive, boundary ring", "false positive, other objects", "false positive, background",
             "false negative, boundary ring", "false negative, inside")
    pixels = dict.fromkeys(kinds, 0)
    union, scores = 0, []
    for sample in heldout_set(20, seed=1, occlusion=False):
        predictor.set_image(sample.image)
        others_all = sample.labels > 0
        for mask in ground_truth_objects(sample.labels):
            predicted = predictor.predict(box=tight_box(mask), multimask_output=False)[0][0]
            ring = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_erosion(mask, iterations=2)
            others = others_all & ~mask
            extra, missed = predicted & ~mask, mask & ~predicted
            for kind, where in zip(kinds, (extra & ring & ~others, extra & others, extra & ~ring & ~others,
                                           missed & ring, missed & ~ring)):
                pixels[kind] += int(where.sum())
            union += int((predicted | mask).sum())
            scores.append(iou(predicted, mask))
    print(f"box prompts on {len(scores)} objects, mean IoU {np.mean(scores):.3f}; errors as shares of the summed union:")
    for kind, count in pixels.items():
        print(f"  {kind}: {count / union:.4f}")


def overfit(checkpoint: str, out: Path) -> None:
    samples = heldout_set(16, seed=5, occlusion=False)
    model = build_sam(checkpoint, device="cpu")

    def score() -> str:
        result = evaluate_images(SamPredictor(model), samples)
        return f"point {result['point']:.3f}, box {result['box']:.3f}"

    print("before, on the 16 training images:", score(), flush=True)
    config = TrainConfig(steps=250, lr=3e-4, warmup_steps=10, seed=3, images_per_step=4, objects_per_image=10,
                         iterations=2, weight_decay=0.0, precision="bf16", checkpoint_every=50)
    data = AnnotatedImages([s.image for s in samples], [s.labels for s in samples], seed=3)
    train(model, data, config, out, log_every=25)
    print("after 250 steps, on the same images:", score())


def memorise(checkpoint: str) -> None:
    seen = heldout_set(4, seed=5, occlusion=False)
    unseen = heldout_set(20, seed=1, occlusion=False)
    model = build_sam(checkpoint, device="cpu")

    def score(step: int) -> None:
        model.eval()
        results = [evaluate_images(SamPredictor(model), samples) for samples in (seen, unseen)]
        model.train()
        print(f"after {step} steps: " + "; ".join(
            f"{name} point {r['point']:.3f}, box {r['box']:.3f}" for name, r in zip(("4 seen images", "20 unseen"), results)
        ), flush=True)

    config = TrainConfig(steps=300, lr=3e-4, warmup_steps=10, seed=3, images_per_step=4, objects_per_image=10,
                         iterations=2, weight_decay=0.0, precision="fp32", augment=False)
    data = AnnotatedImages([s.image for s in seen], [s.labels for s in seen], seed=3, augment=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    functions = StepFunctions.for_model(model)
    score(0)  # leaves the model in train mode
    for step in range(config.steps):
        optimization_step(model, optimizer, data, config, step, functions)
        if (step + 1) % 150 == 0:
            score(step + 1)


def eval_like(checkpoint: str, out: Path) -> None:
    model = build_sam(checkpoint, device="cpu")
    config = TrainConfig(steps=300, lr=1e-4, warmup_steps=10, seed=7, images_per_step=4, objects_per_image=10,
                         iterations=2, weight_decay=0.05, precision="bf16", checkpoint_every=25,
                         distractor_probability=0.5)
    data = SyntheticData(seed=7, kind="shapes", shapes=("star", "crescent", "ellipse"), occlusion_probability=0.3)
    train(model, data, config, out, log_every=10)
    print(f"wrote {out / 'model.pth'}; score it with: python experiments/eval_small_model.py --validation "
          f"--amg-images 0 --checkpoint {out / 'model.pth'}")


def iou_head(checkpoint: str, out: Path) -> None:
    name, config, data = PHASES[-1]
    assert config.iou_head_only, name
    model = build_sam(checkpoint, device="cpu")
    train(model, dataclasses.replace(data, seed=11), dataclasses.replace(config, steps=300, seed=11), out, log_every=25)
    print(f"wrote {out / 'model.pth'}; sweep it with: python experiments/eval_small_model.py --sweep-amg 10 "
          f"--checkpoint {out / 'model.pth'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("ceiling", "box-margin", "errors", "overfit", "memorise", "eval-like", "iou-head"))
    parser.add_argument("--checkpoint", default="vit_small", help="model weights (default: the bundled vit_small)")
    parser.add_argument("--out", default=None, help="run folder of overfit, eval-like and iou-head (default: runs/<check>)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out or f"runs/{args.check.replace('-', '_')}")
    if args.check == "ceiling":
        ceiling()
    elif args.check == "box-margin":
        box_margin(args.checkpoint)
    elif args.check == "errors":
        errors(args.checkpoint)
    elif args.check == "overfit":
        overfit(args.checkpoint, out)
    elif args.check == "memorise":
        memorise(args.checkpoint)
    elif args.check == "eval-like":
        eval_like(args.checkpoint, out)
    else:
        iou_head(args.checkpoint, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
