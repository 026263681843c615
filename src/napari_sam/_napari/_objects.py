"""The current object (the preview of what the prompts give) and commits into an output Labels
layer, with undo and redo: shared by the "Segment Anything" widget and ``napari_sam.segment``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from napari.layers import Image, Labels

from ..interactive.engine import objects_to_labels
from ..interactive.history import Edit, next_free_id, plan_commit, plan_volume_commit
from ..interactive.prompts import SliceSpec
from . import _layers
from ._session import SegmentationSession

CURRENT_NAME = "SAM current object"
OUTPUT_NAME = "SAM labels"


class CurrentObject:
    """The objects predicted from the current prompts, shown in the image's "current object"
    Labels layer (ids 1..K on the prompts' slice) until they are committed or cleared.

    Args:
        viewer: the napari viewer.
        on_layer_created: called after the current-object layer had to be (re)created.
    """

    def __init__(self, viewer: Any, on_layer_created: Optional[Callable[[], None]] = None) -> None:
        self.viewer = viewer
        self._on_layer_created = on_layer_created
        self.spec: Optional[SliceSpec] = None
        self.masks: list[np.ndarray] = []
        self._region: Optional[tuple[Any, ...]] = None

    def layer(self, image: Image) -> Optional[Labels]:
        """The image's current-object layer, if there is one."""
        return _layers.find_layer(self.viewer, "current", image)

    def show(self, image: Image, spec: SliceSpec, masks: Sequence[np.ndarray]) -> Labels:
        """Replace what is shown by ``masks`` (HxW bool, the slice's frame) on ``spec``'s slice.

        Returns:
            The current-object layer (created, aligned with the image, when missing or of
            another shape).
        """
        layer = self.layer(image)
        if layer is None or tuple(layer.data.shape) != _layers.spatial_shape(image):
            layer = _layers.make_labels_layer(self.viewer, image, "current", CURRENT_NAME, opacity=0.6)
            _layers.raise_prompt_layers(self.viewer)  # masks must not hide the prompts
            self._region = None
            if self._on_layer_created is not None:
                self._on_layer_created()
        if self._region is not None:
            layer.data[self._region] = 0
        spec.put(layer.data, objects_to_labels(masks, spec.plane_shape, layer.data.dtype))
        self._region = spec.region()
        self.spec, self.masks = spec, list(masks)
        layer.refresh()
        return layer

    def clear(self, image: Optional[Image]) -> None:
        """Forget the current objects and erase them from the layer."""
        layer = None if image is None else self.layer(image)
        if layer is not None and self._region is not None:
            layer.data[self._region] = 0
            layer.refresh()
        self._region = None
        self.spec, self.masks = None, []


def _writer(layer: Labels) -> Callable[[tuple[np.ndarray, ...], np.ndarray], None]:
    def write(indices: tuple[np.ndarray, ...], values: np.ndarray) -> None:
        layer.data_setitem(indices, np.asarray(values))  # recorded in napari's Labels undo history

    return write


def commit_objects(
    session: SegmentationSession, output: Labels, spec: SliceSpec, masks: Sequence[np.ndarray]
) -> Optional[Edit]:
    """Write ``masks`` into ``output`` on ``spec``'s slice with the next free ids, as one undoable step.

    Pixels that already carry a label are kept (see :func:`~napari_sam.interactive.history.plan_commit`).

    Returns:
        The edit (its ``ids`` are the labels given), or None when nothing would change.

    Raises:
        ValueError: ``output`` has another shape than the image's slice frame.
    """
    edit = plan_commit(output.data, spec, masks, first_id=next_free_id(output.data))
    if edit is not None:
        session.history(output).commit(edit, _writer(output))
    return edit


def commit_volume_object(
    session: SegmentationSession, output: Labels, spec: SliceSpec, axis: int, masks: Any
) -> Optional[Edit]:
    """Write one object given per slice along ``axis`` ((N, H, W) bool) into ``output`` with the
    next free id, as one undoable step (see :func:`~napari_sam.interactive.history.plan_volume_commit`)."""
    edit = plan_volume_commit(output.data, spec, axis, masks, first_id=next_free_id(output.data))
    if edit is not None:
        session.history(output).commit(edit, _writer(output))
    return edit


def undo_commit(session: SegmentationSession, output: Optional[Labels]) -> Optional[Edit]:
    """Undo the last commit into ``output``; returns it, or None when there is nothing to undo."""
    return None if output is None else session.history(output).undo(_writer(output))


def redo_commit(session: SegmentationSession, output: Optional[Labels]) -> Optional[Edit]:
    """Redo the last undone commit into ``output``; returns it, or None when there is nothing to redo."""
    return None if output is None else session.history(output).redo(_writer(output))
