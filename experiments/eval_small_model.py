"""Quality of a SAM model on data its training never saw, beside trivial baselines.

Three test sets:

* "synthetic, touching": held-out synthetic images (``napari_sam.training.synthetic.heldout_set``
  with ``occlusion=False``: star-convex polygons, crescents and ellipses, touching but not
  overlapping, varied contrast; seeds the training stream never draws), 256x256. This is
  the set the issue's quality goals describe;
* "synthetic, overlapping": the same seeds and candidate objects with occlusion (a later
  object covers an earlier one, so some objects are cut shapes, and objects of the same
  brightness and texture meet along a faint seam): a harder set, reported beside it;
* scikit-image's ``coins`` photograph, with a ground truth from a classical pipeline
  (``napari_sam.training.evaluation.coins_ground_truth``, after scikit-image's "Comparing
  edge-based and region-based segmentation" example): Sobel elevation map, markers below
  30 (background) and above 150 (coins), watershed, hole filling, connected components;
  components under 100 pixels are dropped.

Prompts, per ground-truth object:

* point: one positive point at the object's centroid, or, where the centroid is not at
  least 2 px inside the object (crescents), at the object pixel farthest from its
  boundary; the best of the three multimask outputs (by IoU with the ground truth);
* point + negative: that point and a negative point at the point of the nearest other
  object (as a user separates touching objects), single output; not a goal of the issue,
  it measures how a negative click elsewhere disturbs the mask;
* box: the object's tight bounding box (x0, y0, x1, y1 of its extreme pixels), single output.

Baselines: "filled box" (the box itself as the mask) and "disk r" (a disk of radius r px
around the point; the best radius is reported, an optimistic baseline). Automatic mask
generation (AMG) recall: the fraction of ground-truth objects matched by some generated
mask with IoU >= 0.5, and its precision, the fraction of generated masks matched to an
object one to one (as in COCO's evaluation: a second mask of an object already matched
counts as a false positive), with the reference's default thresholds and with the two
picks of ``--sweep-amg`` (``AMG_SETTINGS``): "tuned", the best F1 of recall and precision,
and "high recall", the most precise setting whose recall reaches 0.80. Both are chosen on
a second held-out set (10 touching and 10 overlapping images), disjoint from the
evaluation images.

Usage::

    python experiments/eval_small_model.py [--checkpoint PATH] [--images 50] [--json out.json]
    python experiments/eval_small_model.py --validation --amg-images 0 --checkpoint PATH
    python experiments/eval_small_model.py --sweep-amg 10

Without ``--checkpoint`` the bundled ``vit_small`` weights are evaluated (about 6 min on
2 CPU threads, most of it automatic mask generation). A training state
(``runs/vit_small/phase1/training_state.pt``) is accepted too. ``--validation`` swaps in
the second held-out set (seed offset 1), on which training variants are compared so that
the evaluation images play no part in any choice; ``--amg-images 0`` skips the automatic
masks on the synthetic sets (under a minute).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torchvision.ops import nms

from napari_sam import SamAutomaticMaskGenerator, SamPredictor
from napari_sam.checkpoints import SMALL_MODEL_AMG_HIGH_RECALL, SMALL_MODEL_AMG_THRESHOLDS, build_sam
from napari_sam.training.evaluation import coins_ground_truth

DISK_RADII = (3, 5, 8, 12, 16, 20, 24, 28, 32)
MIN_OBJECT_AREA = 25
AMG_SETTINGS = {
    "default": {"points_per_side": 32},
    # the two picks of the --sweep-amg grid on the second held-out set: the best F1 of
    # recall and precision (what the CLI and the widget use for vit_small), and the most
    # precise setting that reaches recall 0.80 there
    "tuned": {"points_per_side": 32, **SMALL_MODEL_AMG_THRESHOLDS},
    "high recall": {"points_per_side": 32, **SMALL_MODEL_AMG_HIGH_RECALL},
}
SIZE_BINS = (25, 300, 1000, 3000, 10**6)  # object areas (px) of the per-size means
SWEEP_GRID = {
    "pred_iou_thresh": (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7),
    "stability_score_thresh": (0.5, 0.65, 0.75, 0.8, 0.85, 0.9),
    "box_nms_thresh": (0.3, 0.4, 0.5, 0.7),
}
AMG_RECALL_GOAL = 0.80


def prompt_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) prompt for a mask: the centroid, or the innermost pixel when the centroid is
    not at least 2 px inside the object."""
    distance = ndimage.distance_transform_edt(mask)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    iy, ix = int(round(cy)), int(round(cx))
    if 0 <= iy < mask.shape[0] and 0 <= ix < mask.shape[1] and distance[iy, ix] >= 2:
        return float(cx), float(cy)
    iy, ix = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return float(ix), float(iy)


def tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def ground_truth_objects(labels: np.ndarray) -> list[np.ndarray]:
    """HxW bool masks of the objects of a label image with at least ``MIN_OBJECT_AREA`` pixels, by id."""
    masks = [labels == index for index in range(1, int(labels.max()) + 1)]
    return [mask for mask in masks if mask.sum() >= MIN_OBJECT_AREA]


def evaluate_images(predictor: SamPredictor, samples) -> dict[str, float]:
    """:func:`summarise` of :func:`evaluate_image` over samples with ``image`` and ``labels``."""
    merged: dict[str, list[float]] = {}
    for sample in samples:
        for name, values in evaluate_image(predictor, sample.image, sample.labels).items():
            merged.setdefault(name, []).extend(values)
    return summarise(merged)


def evaluate_image(predictor: SamPredictor, image: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Per-object IoUs of the model and the baselines on one image."""
    predictor.set_image(image)
    scores: dict[str, list[float]] = {"point": [], "point + negative": [], "box": [], "filled box": [], "area": []}
    scores.update({f"disk {r}": [] for r in DISK_RADII})
    yy, xx = np.mgrid[0 : labels.shape[0], 0 : labels.shape[1]]
    objects = ground_truth_objects(labels)
    points = [prompt_point(mask) for mask in objects]
    for mask, (x, y) in zip(objects, points):
        scores["area"].append(float(mask.sum()))
        masks, _, _ = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        scores["point"].append(max(iou(m, mask) for m in masks))
        # a negative click on the nearest other object, as a user separates touching objects
        others = [p for p in points if p != (x, y)]
        if others:
            nearest = min(others, key=lambda p: (p[0] - x) ** 2 + (p[1] - y) ** 2)
            masks, _, _ = predictor.predict(np.array([[x, y], nearest]), np.array([1, 0]), multimask_output=False)
            scores["point + negative"].append(iou(masks[0], mask))
        box = tight_box(mask)
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        scores["box"].append(iou(masks[0], mask))
        filled = (xx >= box[0]) & (xx <= box[2]) & (yy >= box[1]) & (yy <= box[3])
        scores["filled box"].append(iou(filled, mask))
        for r in DISK_RADII:
            scores[f"disk {r}"].append(iou((xx - x) ** 2 + (yy - y) ** 2 <= r * r, mask))
    return scores


def object_mask_iou(labels: np.ndarray, segmentations: Sequence[np.ndarray]) -> np.ndarray:
    """Objects x masks IoU between the ground-truth objects of ``labels`` (those of at least
    ``MIN_OBJECT_AREA`` pixels) and HxW bool masks."""
    objects = np.array([mask.ravel() for mask in ground_truth_objects(labels)], dtype=np.float32)
    objects = objects.reshape(len(objects), labels.size)
    masks = np.array([m.ravel() for m in segmentations], dtype=np.float32).reshape(len(segmentations), labels.size)
    inter = objects @ masks.T
    union = objects.sum(1)[:, None] + masks.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1)  # objects are never empty, so union > 0


def match_counts(hits: np.ndarray) -> np.ndarray:
    """From an objects x masks bool matrix of IoU >= 0.5: (objects found, objects, masks,
    masks matched one to one to an object: the size of a maximum matching, so duplicates
    do not count)."""
    matched = 0
    if hits.size:
        rows, cols = linear_sum_assignment(hits, maximize=True)
        matched = int(hits[rows, cols].sum())
    return np.array([int(hits.any(1).sum()), hits.shape[0], hits.shape[1], matched])


def amg_recall(model, image: np.ndarray, labels: np.ndarray, settings: dict) -> np.ndarray:
    """:func:`match_counts` of one AMG run with ``settings``."""
    records = SamAutomaticMaskGenerator(model, **settings).generate(image)
    return match_counts(object_mask_iou(labels, [r["segmentation"] for r in records]) >= 0.5)


@dataclass
class Candidates:
    """Every mask of one unfiltered AMG pass over an image, scored against its objects."""

    iou: np.ndarray  # objects x masks IoU with the ground truth
    predicted_iou: np.ndarray  # masks
    stability: np.ndarray  # masks
    boxes: torch.Tensor  # masks x 4 XYXY, as the generator's NMS sees them


def amg_candidates(model, image: np.ndarray, labels: np.ndarray) -> Candidates:
    """One AMG pass with every filter off (thresholds 0, box NMS at 1.0, which removes nothing)."""
    records = SamAutomaticMaskGenerator(
        model, points_per_side=32, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    ).generate(image)
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return Candidates(
        object_mask_iou(labels, [r["segmentation"] for r in records]),
        np.array([r["predicted_iou"] for r in records], dtype=np.float32),
        np.array([r["stability_score"] for r in records], dtype=np.float32),
        boxes,
    )


def select(candidates: Candidates, pred_iou_thresh: float, stability_score_thresh: float,
           box_nms_thresh: float) -> np.ndarray:
    """Indices of the masks the generator keeps with these settings (one crop): predicted
    IoU > threshold and stability >= threshold (each only when > 0), then box NMS ranked
    by predicted IoU, as ``SamAutomaticMaskGenerator`` filters."""
    keep = np.ones(len(candidates.predicted_iou), dtype=bool)
    if pred_iou_thresh > 0:
        keep &= candidates.predicted_iou > pred_iou_thresh
    if stability_score_thresh > 0:
        keep &= candidates.stability >= stability_score_thresh
    index = np.nonzero(keep)[0]
    if len(index) == 0:
        return index
    kept = nms(candidates.boxes[index], torch.from_numpy(candidates.predicted_iou[index]), box_nms_thresh)
    return index[kept.numpy()]


def sweep_amg_thresholds(model, samples, grid: dict[str, Sequence[float]]) -> list[dict]:
    """AMG recall and one-to-one precision on ``samples`` for every combination of the
    settings in ``grid`` (keys: pred_iou_thresh, stability_score_thresh, box_nms_thresh).

    The generator runs once per image with no filter; each setting's filters are then
    applied to those masks (:func:`select`), which gives what a run with that setting
    returns at a fraction of the time (the picks are re-run directly as a check)."""
    candidates = [amg_candidates(model, s.image, s.labels) for s in samples]
    rows = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        found, objects, generated, matched = sum(match_counts(c.iou[:, select(c, **settings)] >= 0.5)
                                                 for c in candidates)
        recall, precision = found / max(objects, 1), matched / max(generated, 1)
        f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        rows.append({**settings, "recall": recall, "precision": precision, "f1": f1, "masks": int(generated)})
    return rows


def choose_settings(rows: list[dict]) -> dict[str, dict]:
    """The sweep's two picks: "tuned", the best F1; "high recall", the most precise setting
    whose recall reaches the issue's 0.80 goal (absent when none does)."""
    keys = [k for k in rows[0] if k.endswith("thresh")]
    picks = {"tuned": max(rows, key=lambda r: (r["f1"], r["recall"]))}
    reaching = [r for r in rows if r["recall"] >= AMG_RECALL_GOAL]
    if reaching:
        picks["high recall"] = max(reaching, key=lambda r: (r["precision"], r["recall"]))
    return {name: {k: row[k] for k in keys} for name, row in picks.items()}


def summarise(scores: dict[str, list[float]]) -> dict[str, float]:
    """Mean IoU per method, the best disk radius, and point / box mean IoU per object size
    (keys "point, area a-b px" and "box, area a-b px" for the ``SIZE_BINS``)."""
    out = {name: float(np.mean(values)) for name, values in scores.items() if name != "area"}
    area = np.asarray(scores["area"])
    for low, high in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
        inside = (area >= low) & (area < high)
        for name in ("point", "box"):
            values = np.asarray(scores[name])[inside]
            out[f"{name}, area {low}-{high} px"] = float(values.mean()) if len(values) else float("nan")
        out[f"objects, area {low}-{high} px"] = int(inside.sum())
    best_disk = max((k for k in out if k.startswith("disk")), key=out.get)
    out["best disk"] = out[best_disk]
    out["best disk radius"] = float(best_disk.split()[1])
    out["objects"] = len(scores["point"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="model weights (default: the bundled vit_small)")
    parser.add_argument("--images", type=int, default=50, help="number of held-out synthetic images")
    parser.add_argument("--amg-images", type=int, default=20, help="synthetic images for the AMG recall")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument(
        "--sweep-amg", type=int, default=0, metavar="N",
        help="instead: AMG recall and precision over a grid of settings (SWEEP_GRID) on N touching and N "
        "overlapping images of a second held-out set (seed offset 1, disjoint from the evaluation set), to "
        "choose AMG_SETTINGS['tuned'] and ['high recall'] (about 3 min for N = 10)",
    )
    parser.add_argument(
        "--validation", action="store_true",
        help="evaluate on the second held-out set (seed offset 1) instead of the evaluation set: for choosing "
        "between training variants without looking at the evaluation images",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_sam.training.synthetic import heldout_set

    model = build_sam(args.checkpoint or "vit_small", device="cpu")
    if args.sweep_amg:
        samples = [s for occlusion in (False, True) for s in heldout_set(args.sweep_amg, seed=1, occlusion=occlusion)]
        rows = sweep_amg_thresholds(model, samples, SWEEP_GRID)
        picks = choose_settings(rows)
        for name, settings in picks.items():
            row = next(r for r in rows if all(r[k] == v for k, v in settings.items()))
            direct = np.zeros(4, dtype=int)
            for sample in samples:
                direct += amg_recall(model, sample.image, sample.labels, {"points_per_side": 32, **settings})
            print(f"{name}: {settings}: recall {row['recall']:.3f}, precision {row['precision']:.3f}, "
                  f"{row['masks']} masks (direct run: recall {direct[0] / direct[1]:.3f}, "
                  f"precision {direct[3] / max(direct[2], 1):.3f}, {direct[2]} masks)", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"picks": picks, "rows": rows}, indent=2))
        return 0
    predictor = SamPredictor(model)
    started = time.perf_counter()
    results: dict[str, dict] = {}

    synthetic = {
        f"synthetic, {name}": heldout_set(
            max(args.images, args.amg_images), seed=int(args.validation), occlusion=occlusion
        )
        for name, occlusion in (("touching", False), ("overlapping", True))
    }
    for set_name, samples in synthetic.items():
        results[set_name] = evaluate_images(predictor, samples[: args.images])

    coins, coin_labels = coins_ground_truth()
    results["coins"] = summarise(evaluate_image(predictor, coins, coin_labels))

    # AMG with the reference's defaults, and with lower thresholds, which a small model's
    # less confident scores need: "relaxed" (a round guess) and "tuned" (chosen with
    # --sweep-amg on images disjoint from these).
    for label, settings in AMG_SETTINGS.items():
        counts = {}
        for set_name, samples in synthetic.items():
            counts[set_name] = np.zeros(4, dtype=int)
            for sample in samples[: args.amg_images]:
                counts[set_name] += amg_recall(model, sample.image, sample.labels, settings)
        counts["coins"] = amg_recall(model, coins, coin_labels, settings)
        for name, (found, objects, generated, matched) in counts.items():
            results[name][f"amg recall {label}"] = found / max(objects, 1)
            results[name][f"amg precision {label}"] = matched / max(generated, 1)
            results[name][f"amg masks {label}"] = int(generated)

    synthetic_goal = {"point": 0.85, "box": 0.90}
    targets = {**{name: synthetic_goal for name in synthetic}, "coins": {"point": 0.90, "box": 0.93}}
    print(f"\nmodel: {args.checkpoint or 'bundled vit_small'}; {time.perf_counter() - started:.0f} s\n")
    print(f"| data | objects | point (best of 3) | point + negative | box | filled box | best disk (r) | "
          f"AMG recall, {' / '.join(AMG_SETTINGS)} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = targets[name]
        amg = " / ".join(
            f"{r[f'amg recall {k}']:.3f} ({r[f'amg masks {k}']} masks, precision {r[f'amg precision {k}']:.2f})"
            for k in AMG_SETTINGS
        )
        print(
            f"| {name} | {r['objects']} | {r['point']:.3f} (goal >= {t['point']}) | {r['point + negative']:.3f} "
            f"| {r['box']:.3f} (goal >= {t['box']}) "
            f"| {r['filled box']:.3f} | {r['best disk']:.3f} ({r['best disk radius']:.0f}) | {amg} |"
        )
    print("\nAMG goal: recall >= 0.80 on the synthetic set (objects found at IoU >= 0.5).")
    for set_name in synthetic:
        print(f"\nBy object area ({set_name}): point / box mean IoU (objects)")
        r = results[set_name]
        for low, high in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
            print(f"  {low}-{high} px: {r[f'point, area {low}-{high} px']:.3f} / {r[f'box, area {low}-{high} px']:.3f} "
                  f"({r[f'objects, area {low}-{high} px']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
