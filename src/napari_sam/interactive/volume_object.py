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


class StackSlices:
    """The slices of an image layer along one axis, as the widget sees and caches them.

    Args:
        engine: the session's engine (its cache keys are the widget's).
        data: the image layer's data; ``rgb``: it has a trailing RGB(A) axis.
        spec: one slice; the others differ from it on ``axis`` only.
        axis: a non-displayed axis.
        contrast_limits: the layer's (low, high) display mapping, used for every slice.
        data_key: the session's key of the layer data (identity and version).
    """

    def __init__(
        self, engine: SamEngine, data: Any, rgb: bool, spec: SliceSpec, axis: int,
        contrast_limits: Optional[Sequence[float]], data_key: Hashable,
    ) -> None:
        self.engine, self.data, self.rgb, self.spec, self.axis = engine, data, rgb, spec, axis
        self.contrast_limits, self.data_key = contrast_limits, data_key

    def __len__(self) -> int:
        return self.spec.shape[self.axis]

    def slice_at(self, position: int) -> SliceSpec:
        return replace(self.spec, index=tuple(int(position) if a == self.axis else v
                                              for a, v in enumerate(self.spec.index)))

    def rgb_slice(self, position: int) -> np.ndarray:
        """Slice ``position`` as displayed: HxWx3 uint8."""
        return display_rgb(self.slice_at(position).take(self.data, rgb=self.rgb), self.contrast_limits, self.rgb)

    def cache_key(self, position: int) -> Hashable:
        return self.engine.cache_key(self.data_key, self.slice_at(position).key, self.contrast_limits)

    def embedder(self) -> Any:
        """slice -> embedding generator, through the engine's cache (:func:`napari_sam.volume.engine_embedder`)."""
        from ..volume import engine_embedder

        return engine_embedder(self.engine, self.rgb_slice, self.cache_key)


def precompute_steps(stack: StackSlices) -> Generator[tuple[int, int], None, int]:
    """Compute the embedding of every slice of ``stack`` not yet in the engine's cache.

    A generator: yields ``(slices_done, slices_total)`` after each slice (closing it stops
    there) and returns how many embeddings were computed. The cache is bounded
    (:data:`~napari_sam.interactive.engine.DEFAULT_CACHE_BYTES`): on a stack whose embeddings
    do not all fit, the oldest are dropped again.
    """
    from ..utils.progress import drain

    stack.engine.adopt_thread_settings()
    stack.engine.ensure_model()
    embed, computed = stack.embedder(), 0
    for position in range(len(stack)):
        if stack.cache_key(position) not in stack.engine.cache:
            drain(embed(position))
            computed += 1
        yield position + 1, len(stack)
    return computed


def propagate_object_steps(
    stack: StackSlices, mask: np.ndarray, settings: Any = None,
) -> Generator[Any, None, np.ndarray]:
    """Propagate ``mask`` (the object on ``stack.spec``'s slice) along ``stack.axis``.

    A generator: yields :class:`napari_sam.volume.VolumeProgress` per encoder step and per
    slice (closing it stops between steps) and returns (N, H, W) bool masks, N = ``len(stack)``,
    in the slice's (row, col) frame, for :func:`napari_sam.interactive.history.plan_volume_commit`.
    Embeddings come from, and go to, the engine's cache under the widget's keys.

    Args:
        stack: the slices (:class:`StackSlices`).
        mask: HxW bool, the object on ``stack.spec``'s slice.
        settings: :class:`napari_sam.volume.PropagationSettings` (default: its defaults).
    """
    from ..predictor import SamPredictor
    from ..volume import propagation_steps

    engine = stack.engine
    engine.adopt_thread_settings()
    model = engine.ensure_model()
    # Its own predictor: the widget's live predictions keep using the engine's meanwhile.
    predictor = SamPredictor(model, precision=engine.precision)
    anchors = {stack.spec.index[stack.axis]: np.asarray(mask, dtype=bool)}
    result = yield from propagation_steps(predictor, len(stack), anchors, stack.embedder(), settings)
    return result.masks
