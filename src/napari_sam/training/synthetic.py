"""Synthetic microscopy-like images with instance labels, for training SAM from scratch.

Each call draws one image of a random *kind*:

* ``"nuclei"``: fluorescence-like nuclei (ellipses and star-convex blobs, often touching,
  bright on dark, with a dim seam where two touch);
* ``"cells"``: larger irregular cells, textured cytoplasm with a brighter nucleus inside
  (the label is the whole cell), packed so that many touch;
* ``"phase"`` (not drawn unless asked for): phase-contrast-like cells, interior close to
  the background level, a dark rim and a bright halo outside;
* ``"shapes"``: ellipses, star-convex polygons, crescents and thresholded-noise blobs,
  smooth or textured, bright on dark or dark on bright, overlapping (a later object
  occludes an earlier one; its label is what stays visible);

with a random background (level, gradient, smooth texture), contrast from faint to strong,
optical blur, Gaussian or Poisson-like noise, 8- or 16-bit integers or float32, grayscale
or colour (a fluorescence composite or a colour per object).

The label image is HxW int32: 0 is background, objects are numbered 1..N in drawing
order. Objects smaller than ``min_area`` pixels after occlusion get no label: they stay in
the image as unlabelled clutter, and no prompt targets them.

The held-out evaluation sets (:func:`heldout_set`) use only the shapes the quality targets
name (star-convex polygons, crescents, ellipses), touching objects and varied contrast,
with seeds the training stream never draws (training seeds are non-negative, held-out
seeds start at 10**9); with ``occlusion=False`` objects touch without overlapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

KINDS = ("nuclei", "cells", "shapes")  # what the training stream draws from
# Not in the from-scratch training stream: phase-contrast-like cells (interior close to the
# background, a dark rim and a bright halo), used to check fine-tuning on a new kind.
EXTRA_KINDS = ("phase",)
HELDOUT_SEED = 10**9
# Without occlusion, a candidate object overlapping earlier ones by more than this fraction
# of its area is dropped (smaller overlaps are cut from it, so the objects touch).
MAX_OVERLAP_WITHOUT_OCCLUSION = 0.1


@dataclass
class SyntheticImage:
    """One synthetic sample.

    Attributes:
        image: HxW (grayscale) or HxWx3 (colour) array, uint8, uint16 or float32.
        labels: HxW int32 instance labels, 0 = background.
        kind: which generator made it (see the module docstring).
    """

    image: np.ndarray
    labels: np.ndarray
    kind: str


# --------------------------------------------------------------------------- shapes
def _ellipse(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    ratio = rng.uniform(0.5, 1.0)
    a, b = radius / np.sqrt(ratio), radius * np.sqrt(ratio)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _star(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    """Star-convex shape: radius as a smooth random function of the angle."""
    n = int(rng.integers(3, 8))
    amplitudes = rng.uniform(0, 0.35, n) / np.arange(1, n + 1) ** rng.uniform(0.3, 1.0)
    phases = rng.uniform(0, 2 * np.pi, n)
    angle = np.arctan2(yy, xx)
    r = 1.0 + sum(a * np.cos((k + 1) * angle + p) for k, (a, p) in enumerate(zip(amplitudes, phases)))
    return np.hypot(yy, xx) <= radius * np.clip(r, 0.35, None)


def _crescent(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi)
    shift = radius * rng.uniform(0.35, 0.7)
    inner = radius * rng.uniform(0.7, 0.95)
    outer = np.hypot(yy, xx) <= radius
    bite = np.hypot(yy - shift * np.sin(theta), xx - shift * np.cos(theta)) <= inner
    return outer & ~bite


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    """Irregular blob: a disk whose edge is perturbed by smoothed noise."""
    noise = ndimage.gaussian_filter(rng.standard_normal(yy.shape), sigma=max(radius / 3, 1.0))
    noise /= noise.std() + 1e-6
    return np.hypot(yy, xx) / radius + 0.25 * noise <= 1.0


SHAPES = {"ellipse": _ellipse, "star": _star, "crescent": _crescent, "blob": _blob}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma)
    return field / (field.std() + 1e-6)


# --------------------------------------------------------------------------- drawing
def _place_objects(
    rng: np.random.Generator, shape: tuple[int, int], kind: str, shape_names: tuple[str, ...],
    touching: float, min_area: int, occlusion: bool = True,
) -> tuple[np.ndarray, list[dict]]:
    """Draw objects one after another into a label image.

    With ``occlusion`` a later object covers an earlier one where they overlap. Without it
    a new object that would cover more than ``MAX_OVERLAP_WITHOUT_OCCLUSION`` of its own
    area of earlier objects is not drawn, and a smaller overlap stays with the earlier
    object: the objects touch and keep (almost) their whole outline. The random draws are
    the same either way, so the two modes place the same candidates.
    """
    height, width = shape
    labels = np.zeros(shape, np.int32)
    objects: list[dict] = []
    scale = min(height, width)
    if kind == "cells":
        mean_radius = rng.uniform(0.07, 0.14) * scale
        count = int(rng.integers(4, 16))
    elif kind == "nuclei":
        mean_radius = rng.uniform(0.025, 0.08) * scale
        count = int(rng.integers(5, 30))
    else:
        mean_radius = rng.uniform(0.03, 0.12) * scale
        count = int(rng.integers(3, 20))
    centers: list[tuple[float, float, float]] = []
    for _ in range(count):
        radius = float(np.clip(mean_radius * rng.lognormal(0, 0.3), 4.0, 0.4 * scale))
        if centers and rng.random() < touching:
            cy, cx, cr = centers[int(rng.integers(len(centers)))]
            angle = rng.uniform(0, 2 * np.pi)
            dist = (cr + radius) * rng.uniform(0.8, 1.0)
            y, x = cy + dist * np.sin(angle), cx + dist * np.cos(angle)
        else:
            y, x = rng.uniform(0, height), rng.uniform(0, width)
        name = str(rng.choice(shape_names))
        box = int(np.ceil(radius * 1.6)) + 2
        y0, y1 = max(int(y) - box, 0), min(int(y) + box + 1, height)
        x0, x1 = max(int(x) - box, 0), min(int(x) + box + 1, width)
        if y1 - y0 < 3 or x1 - x0 < 3:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        mask = SHAPES[name](rng, yy - y, xx - x, radius)
        drawn = int(mask.sum())
        if drawn < min_area:
            continue
        if not occlusion:
            taken = labels[y0:y1, x0:x1] > 0
            if (mask & taken).sum() > MAX_OVERLAP_WITHOUT_OCCLUSION * drawn:
                continue
            mask &= ~taken
        index = len(objects) + 1
        labels[y0:y1, x0:x1][mask] = index
        objects.append({"index": index, "shape": name, "radius": radius, "drawn_area": drawn})
        centers.append((y, x, radius))
    return labels, objects


def _finish_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop objects whose visible part is too small; renumber 1..N."""
    areas = np.bincount(labels.ravel())
    keep = np.flatnonzero(areas >= min_area)
    keep = keep[keep > 0]
    lookup = np.zeros(len(areas), np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lookup[labels]


def _label_edges(labels: np.ndarray, between_objects: bool = False) -> np.ndarray:
    """HxW bool: pixels with a 4-neighbour of another label (both objects when
    ``between_objects``, i.e. where two objects touch, not object against background)."""
    edges = np.zeros(labels.shape, bool)
    inside = labels > 0
    for axis in (0, 1):
        first = [slice(None)] * 2
        second = [slice(None)] * 2
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        first, second = tuple(first), tuple(second)
        differ = labels[first] != labels[second]
        if between_objects:
            differ &= inside[first] & inside[second]
        edges[first] |= differ
        edges[second] |= differ
    return edges


def _render(
    rng: np.random.Generator, labels: np.ndarray, kind: str, contrast: tuple[float, float], colour: bool,
) -> np.ndarray:
    """Intensity image (HxWxC float, C = 1 or 3) for a label image."""
    height, width = labels.shape
    n = int(labels.max())
    channels = 3 if colour else 1
    # background: level + linear gradient + smooth texture
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (rng.uniform(-1, 1) * yy / height + rng.uniform(-1, 1) * xx / width) * rng.uniform(0, 0.3)
    texture = _smooth_noise(rng, labels.shape, rng.uniform(2, 20)) * rng.uniform(0, 0.08)
    base = 0.2 + gradient + texture
    polarity = 1.0 if (kind != "shapes" or rng.random() < 0.7) else -1.0
    if colour and rng.random() < 0.5:
        tint = rng.uniform(0.2, 1.0, 3)
        background = base[..., None] * tint
    else:
        background = np.repeat(base[..., None], channels, axis=2)
    image = background.astype(np.float32)
    if n == 0:
        return image
    object_level = rng.uniform(*contrast, n + 1).astype(np.float32) * polarity
    object_level[0] = 0.0
    levels = object_level[labels]
    textured = rng.random() < 0.5
    if textured:
        sigma = rng.uniform(0.7, 3.0)
        levels = levels * (1.0 + rng.uniform(0.1, 0.5) * _smooth_noise(rng, labels.shape, sigma))
    if kind == "cells":  # a brighter nucleus in the middle of each cell
        distance = ndimage.distance_transform_edt(labels > 0)
        peak = ndimage.maximum(distance, labels, index=np.arange(n + 1))
        relative = distance / np.maximum(peak[labels], 1e-6)
        levels = levels * (1.0 + (relative > rng.uniform(0.45, 0.7)) * rng.uniform(0.3, 1.0))
    # soft edges and a dim seam where objects touch
    inside = labels > 0
    edge = ndimage.gaussian_filter(inside.astype(np.float32), rng.uniform(0.3, 1.2))
    seam = _label_edges(labels, between_objects=True)
    levels = np.where(seam, levels * rng.uniform(0.3, 0.8), levels)
    levels = ndimage.gaussian_filter(levels, rng.uniform(0.3, 1.0)) * np.maximum(edge, inside)
    if colour:
        if kind == "shapes" and rng.random() < 0.5:
            colours = rng.uniform(0.2, 1.0, (n + 1, 3)).astype(np.float32)
            weights = colours[labels]
        else:
            weights = np.broadcast_to(rng.dirichlet(np.ones(3)).astype(np.float32) * 2.0, (height, width, 3))
        image = image + levels[..., None] * weights
    else:
        image = image + levels[..., None]
    return image


def _render_phase(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Phase-contrast-like intensity image (HxWx1 float) for a label image."""
    inside = labels > 0
    texture = _smooth_noise(rng, labels.shape, rng.uniform(3, 15)) * rng.uniform(0.01, 0.04)
    image = 0.5 + texture + inside * rng.uniform(-0.06, 0.06)
    image += inside * _smooth_noise(rng, labels.shape, rng.uniform(0.7, 2.0)) * rng.uniform(0.01, 0.05)
    rim = _label_edges(labels)
    image -= (rim & inside) * rng.uniform(0.1, 0.3)
    halo_width = rng.uniform(1.5, 4.0)
    outside_distance = ndimage.distance_transform_edt(~inside)
    image += (~inside) * np.exp(-outside_distance / halo_width) * rng.uniform(0.15, 0.4)
    return ndimage.gaussian_filter(image.astype(np.float32), 0.6)[..., None]


def _degrade_and_encode(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blur, noise and conversion to a random storage dtype."""
    blur = rng.uniform(0, 2.0)
    if blur > 0.3:
        image = ndimage.gaussian_filter(image, (blur, blur, 0))
    span = float(image.max() - image.min()) + 1e-6
    if rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(0.0, 0.08) * span, image.shape).astype(np.float32)
    else:
        photons = rng.uniform(20, 400)
        shifted = (image - image.min()) / span * photons
        image = rng.poisson(shifted).astype(np.float32) / photons * span + image.min()
    dtype = rng.choice(["uint8", "uint16", "float32"], p=[0.45, 0.4, 0.15])
    low, high = float(image.min()), float(image.max())
    unit = (image - low) / max(high - low, 1e-6)
    if dtype == "uint8":
        out = np.clip(unit * rng.uniform(120, 255) + rng.uniform(0, 30), 0, 255).astype(np.uint8)
    elif dtype == "uint16":
        out = np.clip(unit * rng.uniform(500, 60000) + rng.uniform(0, 2000), 0, 65535).astype(np.uint16)
    else:
        out = (unit * rng.uniform(0.5, 1000)).astype(np.float32)
    return out[..., 0] if out.shape[2] == 1 else out


def synthetic_image(
    rng: np.random.Generator, shape: Optional[tuple[int, int]] = None, kind: Optional[str] = None,
    shapes: Optional[tuple[str, ...]] = None, min_area: int = 25, occlusion: bool = True,
) -> SyntheticImage:
    """Draw one synthetic image with its instance labels.

    Args:
        rng: numpy random generator (the only source of randomness).
        shape: (H, W) in pixels; default: long side 256, aspect ratio 0.6 to 1, either orientation.
        kind: "nuclei", "cells" or "shapes" (default: random among these), or "phase".
        shapes: shape names to draw from (default by kind); any of "ellipse", "star",
            "crescent", "blob".
        min_area: smallest visible object area in pixels that gets a label.
        occlusion: objects may overlap, a later one covering an earlier one (its label is
            what stays visible); when False, objects touch but do not overlap (see
            ``MAX_OVERLAP_WITHOUT_OCCLUSION``), so every object keeps its drawn shape.

    Returns:
        A :class:`SyntheticImage`.
    """
    if shape is None:
        short = int(256 * rng.uniform(0.6, 1.0))
        shape = (256, short) if rng.random() < 0.5 else (short, 256)
    kind = kind or str(rng.choice(KINDS))
    if kind not in KINDS + EXTRA_KINDS:
        raise ValueError(f"kind must be one of {KINDS + EXTRA_KINDS}, got {kind!r}.")
    if shapes is None:
        shapes = {"nuclei": ("ellipse", "star", "blob"), "cells": ("star", "blob", "ellipse"),
                  "phase": ("star", "blob", "ellipse")}.get(
            kind, tuple(SHAPES)
        )
    touching = {"nuclei": 0.5, "cells": 0.8, "phase": 0.5}.get(kind, 0.4)
    labels, _ = _place_objects(
        rng, shape, "cells" if kind == "phase" else kind, tuple(shapes), touching, min_area, occlusion
    )
    labels = _finish_labels(labels, min_area)
    if kind == "phase":
        image = _render_phase(rng, labels)
    else:
        low = rng.uniform(0.08, 0.6)
        image = _render(rng, labels, kind, (low, low + rng.uniform(0.1, 0.8)), colour=rng.random() < 0.35)
    return SyntheticImage(_degrade_and_encode(rng, image), labels, kind)


def heldout_set(count: int = 50, seed: int = 0, occlusion: bool = True) -> list[SyntheticImage]:
    """Held-out evaluation images: star-convex polygons, crescents and ellipses only,
    touching objects, varied contrast; seeds disjoint from any training seed.

    Args:
        count: number of images.
        seed: offset added to ``HELDOUT_SEED`` (different offsets give different sets).
        occlusion: True: objects also overlap, a later one covering an earlier one, so some
            visible parts are cut shapes (the harder set); False: objects touch without
            overlapping and keep their drawn shapes (the set the issue's quality goals
            describe). Both use the same seeds and the same candidate objects.

    Returns:
        ``count`` :class:`SyntheticImage` of kind "shapes", each 256x256.
    """
    out = []
    for i in range(count):
        rng = np.random.default_rng(HELDOUT_SEED + seed * 100_003 + i)
        out.append(synthetic_image(
            rng, shape=(256, 256), kind="shapes", shapes=("star", "crescent", "ellipse"), occlusion=occlusion,
        ))
    return out
