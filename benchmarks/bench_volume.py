"""Volume segmentation (napari_sam.volume) on synthetic 16-bit stacks, with the bundled vit_small.

Prints, per noise seed: propagation from one positive click on each object's middle slice
(3-D IoU with the ground truth per object and their mean, end-slice errors, seconds per
visited slice), then automatic 3-D (ground-truth objects matched at 3-D IoU >= 0.5 by one
id, extra ids, seconds per slice). The volumes are made here (:func:`make_volume`; the
tests use the same one)::

    .venv/bin/python benchmarks/bench_volume.py [--seeds 0 1] [--no-automatic]

The volumes: bright blobs (superellipsoids: cells are blunter than ellipsoids at their
ends) on a noisy, unevenly lit background; each object's cross-section changes shape (its
in-plane semi-axes and orientation change with the slice) and drifts between slices; two
objects touch on their middle slices; one ends mid-stack, one starts mid-stack.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

# AMG settings for these volumes: vit_small's own thresholds (AmgSettings.for_model) keep only
# 0-2 masks per slice here, so the thresholds are lowered; 8x8 points suffice for 4 blobs.
AUTOMATIC_SETTINGS = dict(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.7)


@dataclass(frozen=True)
class Blob:
    z0: float
    y0: float
    x0: float
    rz: float
    ry: float
    rx: float
    drift_y: float = 0.0  # pixels per slice
    drift_x: float = 0.0
    turn: float = 0.0  # radians per slice of the cross-section's orientation
    stretch: float = 0.0  # relative change of ry/rx per slice
    brightness: float = 1.0


DEFAULT_BLOBS = (
    Blob(12, 40, 40, 9, 17, 12, drift_x=1.0, turn=0.06, stretch=0.015, brightness=1.0),
    # touches the first one on its middle and later slices
    Blob(12, 44, 70, 8, 13, 15, drift_y=0.5, turn=-0.05, brightness=0.75),
    Blob(7, 96, 44, 5, 15, 15, drift_x=-0.8, stretch=0.02, brightness=0.9),  # ends mid-stack
    Blob(17, 92, 96, 6, 14, 19, drift_y=-0.8, turn=0.08, brightness=1.1),  # starts mid-stack
)


def make_volume(shape=(24, 128, 128), blobs=DEFAULT_BLOBS, seed: int = 0, noise: float = 180.0):
    """(volume uint16 (Z, Y, X), ground-truth labels uint32 (Z, Y, X), one id per blob in order)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    labels = np.zeros(shape, dtype=np.uint32)
    signal = np.zeros(shape, dtype=np.float64)
    texture = gaussian_filter(rng.normal(size=shape), 2.0) * 6.0
    for label, b in enumerate(blobs, start=1):
        for z in range(nz):
            t = (z - b.z0) / b.rz
            if abs(t) >= 1:
                continue
            scale = (1 - t ** 4) ** 0.25
            dz = z - b.z0
            cy, cx = b.y0 + b.drift_y * dz, b.x0 + b.drift_x * dz
            angle = b.turn * dz
            ry = b.ry * (1 + b.stretch * dz) * scale
            rx = b.rx * (1 - b.stretch * dz) * scale
            u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
            v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
            inside = (u / max(ry, 0.5)) ** 2 + (v / max(rx, 0.5)) ** 2 <= 1
            labels[z][inside] = label
            signal[z][inside] = b.brightness * (1 + 0.25 * texture[z][inside])
    edges = gaussian_filter(signal, (0.5, 1.0, 1.0))
    background = 900 + 300 * (xx / nx) + 200 * (yy / ny)
    volume = background[None] + 2600 * edges + rng.normal(0, noise, size=shape)
    return np.clip(volume, 0, 65535).astype(np.uint16), labels


def object_ends(labels: np.ndarray, label: int) -> tuple[int, int]:
    """First and last slice where ``label`` is present."""
    present = np.flatnonzero((labels == label).any(axis=(1, 2)))
    return int(present[0]), int(present[-1])


def middle_click(labels: np.ndarray, label: int) -> tuple[int, np.ndarray]:
    """The object's middle slice and a 1x2 (x, y) point deep inside it there."""
    from scipy.ndimage import distance_transform_edt

    first, last = object_ends(labels, label)
    z = (first + last) // 2
    distance = distance_transform_edt(labels[z] == label)
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return z, np.array([[col, row]], dtype=np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def end_errors(mask: np.ndarray, labels: np.ndarray, label: int) -> tuple[int, int]:
    """|first slice found - true first|, |last found - true last| (the stack length when nothing was found)."""
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    first, last = object_ends(labels, label)
    if not len(present):
        return len(mask), len(mask)
    return abs(int(present[0]) - first), abs(int(present[-1]) - last)


def match_objects(found: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    """(ground-truth objects matched by one found id at 3-D IoU >= threshold, found ids, extra ids).

    A found id matches the ground-truth object it overlaps best; an object is matched when
    exactly one id matches it at ``threshold`` or more; ids matching nothing are extra.
    """
    ids = [int(i) for i in np.unique(found) if i]
    truth = [int(i) for i in np.unique(labels) if i]
    hits: dict[int, list[int]] = {t: [] for t in truth}
    extra = 0
    for i in ids:
        region = found == i
        scores = [(iou(region, labels == t), t) for t in truth]
        best, t = max(scores)
        if best >= threshold:
            hits[t].append(i)
        else:
            extra += 1
    matched = sum(1 for t in truth if len(hits[t]) == 1)
    extra += sum(max(len(h) - 1, 0) for h in hits.values())
    return matched, len(ids), extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-automatic", action="store_true")
    args = parser.parse_args()

    import torch

    from napari_sam import AmgSettings, SamPredictor, build_sam
    from napari_sam.volume import segment_volume, segment_volume_automatic

    torch.manual_seed(0)
    predictor = SamPredictor(build_sam("vit_small"))
    print(f"torch threads: {torch.get_num_threads()}, model vit_small (bundled), CPU")
    for seed in args.seeds:
        volume, labels = make_volume(seed=seed)
        print(f"\nseed {seed}: volume {volume.shape} {volume.dtype}, {labels.max()} objects")
        ious, errors, visited, seconds = [], [], 0, 0.0
        for label in range(1, int(labels.max()) + 1):
            z, point = middle_click(labels, label)
            steps = []
            start = time.perf_counter()
            mask = segment_volume(volume, z, point_coords=point, point_labels=[1], model=predictor,
                                  progress=steps.append)
            seconds += time.perf_counter() - start
            visited += len({p.slice_index for p in steps})
            ious.append(iou(mask, labels == label))
            errors.append(end_errors(mask, labels, label))
            print(f"  object {label}: clicked slice {z}, true slices {object_ends(labels, label)}, "
                  f"3-D IoU {ious[-1]:.3f}, end errors {errors[-1]}")
        print(f"  propagation: mean 3-D IoU {np.mean(ious):.3f}, worst end error {max(max(e) for e in errors)}, "
              f"mean end error {np.mean(errors):.2f} slices, {seconds / visited:.2f} s per visited slice")
        if args.no_automatic:
            continue
        settings = AmgSettings.for_model("vit_small", **AUTOMATIC_SETTINGS)
        start = time.perf_counter()
        found, table = segment_volume_automatic(volume, model=predictor, settings=settings, return_table=True)
        seconds = time.perf_counter() - start
        matched, n_found, extra = match_objects(found, labels)
        truth = int(labels.max())
        print(f"  automatic 3-D ({AUTOMATIC_SETTINGS}): {matched}/{truth} objects matched ({matched / truth:.0%}), "
              f"{n_found} ids, {extra} extra ({extra / truth:.0%}), {seconds / len(volume):.2f} s per slice")
        for row in zip(*table.values()):
            print("    " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in zip(table, row)))


if __name__ == "__main__":
    main()
