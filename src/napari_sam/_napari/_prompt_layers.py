"""The prompt layers: reading a Points layer (positive / negative points) and a Shapes layer
(boxes) as SAM prompts on the displayed slice, and editing them (clearing a slice, flipping
points). Shared by the "Segment Anything" widget and ``napari_sam.segment``."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from napari.layers import Image, Points, Shapes

from ..interactive.prompts import NEGATIVE, POSITIVE, SlicePrompts, SliceSpec, build_prompts
from . import _layers


def read_prompts(viewer: Any, image: Image, points: Optional[Points], shapes: Optional[Shapes]) -> tuple[
    SliceSpec, SlicePrompts
]:
    """The slice the viewer shows of ``image`` and the prompts on it, in the image's data frame.

    Points carry their polarity in the ``label`` feature ("positive" / "negative"; all
    positive without it); each shape's bounding box is one box prompt (one object per box).
    Layers with other transforms than the image are mapped through world coordinates.

    Raises:
        ValueError: a 3-D view, or prompts that cannot be read.
    """
    spec = _layers.current_slice(viewer, image)
    coords, labels = _layers.prompt_points(points, image)
    return spec, build_prompts(spec, coords, labels, _layers.prompt_boxes(shapes, image))


def remove_prompts_on_slice(image: Image, spec: SliceSpec, points: Optional[Points], shapes: Optional[Shapes]) -> None:
    """Delete the points and the shapes that lie on ``spec``'s slice (the others stay)."""
    if points is not None and len(points.data):
        on = spec.on_slice(_layers.to_image_frame(points, image, points.data))
        if on.any():
            points.selected_data = set(np.flatnonzero(on).tolist())
            points.remove_selected()
    if shapes is not None and len(shapes.data):
        on = [bool(spec.on_slice(_layers.to_image_frame(shapes, image, v)).all()) for v in shapes.data]
        if any(on):
            shapes.selected_data = {i for i, flag in enumerate(on) if flag}
            shapes.remove_selected()


def flip_selected_points(points: Points) -> bool:
    """In select mode, switch the selected points between positive and negative.

    Returns:
        Whether any point changed (in add mode napari keeps the last added point selected,
        so nothing is flipped there).
    """
    selected = sorted(points.selected_data) if points.mode == "select" else []
    if not selected:
        return False
    features = points.features.copy()
    for i in selected:
        features.loc[features.index[i], "label"] = POSITIVE if features["label"].iloc[i] == NEGATIVE else NEGATIVE
    points.features = features
    points.refresh_colors()
    return True


def polarity(negative: bool) -> str:
    """The ``label`` feature value of a new point."""
    return NEGATIVE if negative else POSITIVE


def shift_pressed(event: Any) -> bool:
    """Whether Shift is held in a napari mouse event."""
    return "Shift" in [str(getattr(m, "name", m)) for m in event.modifiers]
