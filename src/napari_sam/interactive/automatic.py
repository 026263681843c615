"""Automatic segmentation of napari image slices into one label image (Qt-free core).

Runs :meth:`napari_sam.SamAutomaticMaskGenerator.generate_iter` on one or several 2-D
slices as they are displayed (contrast limits applied, see
:func:`~napari_sam.interactive.engine.display_rgb`) and paints the masks into a label
image: mask *i* of a slice (in the generator's record order) gets id ``offset + i + 1``;
where masks overlap, the **smaller mask stays visible** (larger masks are painted first).
A features table gives every id's predicted IoU, stability score, area and bbox.

Large slices are segmented tile by tile (:func:`tiled_automatic_steps`, with
:class:`napari_sam.TiledAutomaticMaskGenerator`), reading each slice lazily and showing
progress over tiles and point batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Optional, Sequence

import numpy as np

from ..utils.labels import paint_masks
from ..utils.progress import relabel
from .prompts import SliceSpec

FEATURE_COLUMNS = ("label", "predicted_iou", "stability_score", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h")


@dataclass
class AutomaticProgress:
    """Progress over all slices: ``done`` of ``total`` point batches, on slice ``slice_index``;
    for a tiled slice, on tile ``tile`` (1-based) of ``tiles`` (0 of 0 when untiled)."""

    done: int
    total: int
    slice_index: int
    slices: int
    masks: int
    tile: int = 0
    tiles: int = 0


@dataclass
class AutomaticResult:
    """Label images of the segmented slices and one features row per label id."""

    slices: list[SliceSpec]
    labels: list[np.ndarray]
    features: dict[str, list] = field(default_factory=lambda: {name: [] for name in FEATURE_COLUMNS})


def records_to_labels(
    records: Sequence[dict[str, Any]], shape: tuple[int, int], offset: int = 0
) -> tuple[np.ndarray, dict[str, list]]:
    """Paint AMG records (``binary_mask`` output) into an HxW uint32 label image.

    Args:
        records: ``SamAutomaticMaskGenerator`` records with boolean ``segmentation``.
        shape: (H, W).
        offset: the first record gets id ``offset + 1``.

    Returns:
        labels (HxW uint32; larger masks painted first so smaller ones stay visible) and
        the features columns (one row per record, ``label`` = its id).
    """
    masks = [record["segmentation"] for record in records]
    labels = paint_masks(masks, shape, range(offset + 1, offset + len(records) + 1), dtype=np.uint32,
                         areas=[record["area"] for record in records])
    features: dict[str, list] = {name: [] for name in FEATURE_COLUMNS}
    for i, record in enumerate(records):
        x0, y0, w, h = record["bbox"]
        row = (offset + i + 1, float(record["predicted_iou"]), float(record["stability_score"]), int(record["area"]),
               x0, y0, w, h)
        for name, value in zip(FEATURE_COLUMNS, row):
            features[name].append(value)
    return labels, features


def automatic_steps(
    generator: Any,
    planes: Sequence[tuple[SliceSpec, np.ndarray]],
    offset: int = 0,
) -> Generator[AutomaticProgress, None, AutomaticResult]:
    """Segment every given slice, yielding progress after each point batch.

    Args:
        generator: a ``SamAutomaticMaskGenerator`` with ``output_mode="binary_mask"``.
        planes: (slice, HxWx3 uint8 RGB as displayed) pairs.
        offset: ids start after this value (e.g. the largest id already in the output layer).

    Returns:
        An :class:`AutomaticResult`. Stopping the iteration (closing the generator) cancels
        between batches and releases the image embedding.
    """
    runs = [(spec, generator.generate_iter(rgb)) for spec, rgb in planes]  # generators: nothing runs yet
    return (yield from _segment_slices(runs, offset, lambda p: (p.masks_so_far, 0, 0)))


def tiled_automatic_steps(
    generator: Any,
    planes: Sequence[tuple[SliceSpec, Any, int]],
    contrast_limits: Optional[Sequence[float]] = None,
    offset: int = 0,
) -> Generator[AutomaticProgress, None, AutomaticResult]:
    """Segment every given slice tile by tile, yielding progress over tiles and point batches.

    Args:
        generator: a :class:`napari_sam.TiledAutomaticMaskGenerator` (``binary_mask`` output);
            its progress (:class:`napari_sam.tiled_amg.TiledAmgProgress`) counts point batches
            over all tiles and names the tile.
        planes: (slice, HxW or HxWxC image of the slice, plane index in the generator's
            embedding store) triples; the image is the layer's data as it is (any real dtype;
            a lazy :class:`~napari_sam.interactive.engine.SlicePlane` is read tile by tile).
        contrast_limits: the layer's (low, high) display mapping, the same for every slice and
            tile (as napari shows it).
        offset: ids start after this value.

    Returns:
        An :class:`AutomaticResult` (records in the full slice's frame, painted as
        :func:`records_to_labels` does). Closing the generator cancels between steps.
    """
    runs = [(spec, generator.generate_iter(plane, contrast_limits, plane_index=plane_index))
            for spec, plane, plane_index in planes]
    return (yield from _segment_slices(runs, offset, lambda p: (p.masks_kept, p.tile_index + 1, p.n_tiles)))


def _segment_slices(
    runs: Sequence[tuple[SliceSpec, Generator[Any, None, list]]], offset: int, details: Any
) -> Generator[AutomaticProgress, None, AutomaticResult]:
    """Run each slice's generator in turn (progress with ``done`` / ``total`` and returning records),
    painting its records; ``details(progress)`` gives (masks kept, tile number, tiles).

    Every slice has the same number of steps (one grid of points, the same crops or tiles), so
    the total is the first slice's times the number of slices. Closing this generator closes
    the running slice's generator and drops the others unstarted.
    """
    done = 0
    result = AutomaticResult(slices=[], labels=[])
    try:
        for index, (spec, run) in enumerate(runs):
            per_slice = [0]

            def outer(progress: Any, index: int = index) -> AutomaticProgress:
                per_slice[0] = int(progress.total)
                kept, tile, tiles = (int(v) for v in details(progress))
                return AutomaticProgress(done + int(progress.done), per_slice[0] * len(runs), index, len(runs),
                                         kept, tile, tiles)

            records = yield from relabel(run, outer)
            done += per_slice[0]
            labels, features = records_to_labels(records, spec.plane_shape, offset)
            offset += len(records)
            result.slices.append(spec)
            result.labels.append(labels)
            for name in FEATURE_COLUMNS:
                result.features[name].extend(features[name])
        return result
    finally:
        for _, run in runs:
            run.close()


def all_slices(spec: SliceSpec) -> list[SliceSpec]:
    """Every slice parallel to ``spec`` (same displayed axes), in C order of the other axes."""
    others = [axis for axis in range(spec.ndim) if axis not in spec.displayed]
    out = []
    for position in np.ndindex(*[spec.shape[axis] for axis in others]):
        index = list(spec.index)
        for axis, value in zip(others, position):
            index[axis] = value
        out.append(SliceSpec(spec.shape, spec.row_axis, spec.col_axis, tuple(index)))
    return out


def link_into_objects(result: AutomaticResult, link: Any = None) -> AutomaticResult:
    """Link the per-slice masks of ``result`` (consecutive slices along one axis) into 3-D objects.

    Each slice's ids become masks (with their predicted IoU) for
    :func:`napari_sam.volume.link_slices`, which assigns them to objects by IoU between
    neighbouring slices (its docstring gives the rule); the result has one id per object,
    the same on every slice, and one features row per object (``label``, first and last
    slice, slices, voxels, mean predicted IoU).

    Args:
        result: from :func:`automatic_steps` over the slices of one axis, in order.
        link: :class:`napari_sam.volume.LinkSettings` (default: its defaults).
    """
    from ..volume import link_slices

    if not result.labels:
        return result
    iou_of = dict(zip(result.features["label"], result.features["predicted_iou"]))
    per_slice = []
    for labels in result.labels:
        ids = np.unique(labels[labels > 0])
        per_slice.append([(labels == i, float(iou_of.get(int(i), 0.0))) for i in ids])
    linked, table = link_slices(per_slice, result.labels[0].shape, link)
    return AutomaticResult(slices=list(result.slices), labels=list(linked), features=table)
