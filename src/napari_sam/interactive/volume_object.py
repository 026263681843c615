"""Segment the current object through a stack or a time-lapse (Qt-free; the widget runs it in a worker).

The object the user prompted on one slice is propagated slice by slice along one
non-displayed axis (z of a stack, t of a time-lapse) by :func:`napari_sam.volume.propagation_steps`.
Slices are read from the layer data as napari displays them (the layer's contrast limits, one
mapping for the whole stack) and embedded through the engine, so the embeddings land in, and
come from, the same cache as the widget's own predictions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Generator, Hashable, Optional, Sequence

import numpy as np

from .engine import SamEngine, display_rgb
from .prompts import SliceSpec


def propagation_axis(spec: SliceSpec, preferred: Optional[int] = None) -> int:
    """The axis to propagate along: ``preferred`` when it is a non-displayed axis longer than 1,
    else the last such axis (z of (Z, Y, X), z of (T, Z, Y, X)).

    Raises:
        ValueError: every non-displayed axis has size 1 (a 2-D image).
    """
    candidates = [a for a in range(spec.ndim) if a not in spec.displayed and spec.shape[a] > 1]
    if not candidates:
        raise ValueError(f"The image has no slices to propagate through (spatial shape {spec.shape}).")
    return int(preferred) if preferred in candidates else candidates[-1]


def propagate_object_steps(
    engine: SamEngine,
    data: Any,
    rgb: bool,
    spec: SliceSpec,
    axis: int,
    mask: np.ndarray,
    contrast_limits: Optional[Sequence[float]],
    data_key: Hashable,
    settings: Any = None,
) -> Generator[Any, None, np.ndarray]:
    """Propagate ``mask`` (the object on ``spec``'s slice) along ``axis``.

    A generator: yields :class:`napari_sam.volume.VolumeProgress` per encoder step and per
    slice (closing it stops between steps) and returns (N, H, W) bool masks, N =
    ``spec.shape[axis]``, in the slice's (row, col) frame, for
    :func:`napari_sam.interactive.history.plan_volume_commit`.

    Args:
        engine: the session's engine (model, cache); embeddings are cached under the same keys
            as the widget's.
        data: the image layer's data; ``rgb``: it has a trailing RGB(A) axis.
        spec: the slice the object was prompted on; ``axis``: a non-displayed axis.
        mask: HxW bool, the object on that slice.
        contrast_limits: the layer's (low, high) display mapping, used for every slice.
        data_key: the session's key of the layer data (identity and version).
        settings: :class:`napari_sam.volume.PropagationSettings` (default: its defaults).
    """
    from ..predictor import SamPredictor
    from ..volume import engine_embedder, propagation_steps

    def slice_at(position: int) -> SliceSpec:
        return replace(spec, index=tuple(int(position) if a == axis else v for a, v in enumerate(spec.index)))

    def rgb_slice(position: int) -> np.ndarray:
        return display_rgb(slice_at(position).take(data, rgb=rgb), contrast_limits, rgb)

    def cache_key(position: int) -> Hashable:
        return engine.cache_key(data_key, slice_at(position).key, contrast_limits)

    engine.adopt_thread_settings()
    model = engine.ensure_model()
    # Its own predictor: the widget's live predictions keep using the engine's meanwhile.
    predictor = SamPredictor(model, precision=engine.precision)
    result = yield from propagation_steps(
        predictor, spec.shape[axis], {spec.index[axis]: np.asarray(mask, dtype=bool)},
        engine_embedder(engine, rgb_slice, cache_key), settings,
    )
    return result.masks
