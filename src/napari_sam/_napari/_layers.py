"""napari layer helpers: prompt and output layers, the current slice, prompts in the image frame.

Every layer made here copies the image layer's ``scale`` and ``translate`` (and units), so
prompts and labels sit exactly on the image, anisotropic voxels included; nothing here ever
changes a transform of a user's layer.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points, Shapes

from ..interactive.prompts import NEGATIVE, POINT_LABELS, POSITIVE, SliceSpec

META_KEY = "napari_sam"
POINT_COLORS = {POSITIVE: "#00ff00", NEGATIVE: "#ff0000"}
LABEL_DTYPE = np.uint32


def image_array(image: Image) -> Any:
    """The full-resolution data of an image layer (level 0 of a multiscale layer)."""
    return image.data[0] if image.multiscale else image.data


def spatial_shape(image: Image) -> tuple[int, ...]:
    """Shape of the image layer without its RGB(A) channel axis."""
    shape = tuple(int(v) for v in image_array(image).shape)
    return shape[:-1] if image.rgb else shape


def transform_kwargs(image: Image) -> dict[str, Any]:
    """Keyword arguments that place a new layer exactly on ``image`` (scale, translate, units)."""
    kwargs: dict[str, Any] = {"scale": tuple(image.scale), "translate": tuple(image.translate)}
    units = getattr(image, "units", None)
    if units is not None:
        kwargs["units"] = units
    return kwargs


def _tag(layer: Any, role: str, image: Image) -> Any:
    layer.metadata[META_KEY] = {"role": role, "image": image.name}
    return layer


def find_layer(viewer: Any, role: str, image: Image) -> Optional[Any]:
    """The layer this plugin made with ``role`` for ``image`` (by metadata), if any."""
    for layer in viewer.layers:
        meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
        if meta and meta.get("role") == role and meta.get("image") == image.name:
            return layer
    return None


PROMPT_ROLES = ("points", "boxes")


def raise_prompt_layers(viewer: Any, extra: Any = ()) -> bool:
    """Move the prompt layers to the top of the layer list when a Labels layer is above one of them.

    Masks drawn over points and boxes would hide them, so prompt layers stay above every
    Labels layer (output, current object, automatic results, the user's own). The prompt
    layers are the ones this plugin made (any image) and ``extra`` (e.g. the Points and Shapes
    layers chosen in the widget); their order among themselves is kept.

    Args:
        viewer: the napari viewer.
        extra: more prompt layers (None entries are ignored).

    Returns:
        Whether any layer moved.
    """
    layers = viewer.layers
    extra_ids = {id(layer) for layer in extra if layer is not None}
    prompts = [
        index for index, layer in enumerate(layers)
        if id(layer) in extra_ids or (_role(layer) in PROMPT_ROLES and isinstance(layer, (Points, Shapes)))
    ]
    top_labels = max((index for index, layer in enumerate(layers) if isinstance(layer, Labels)), default=-1)
    if not prompts or min(prompts) > top_labels:
        return False
    layers.move_multiple(prompts, len(layers))
    return True


def _role(layer: Any) -> Optional[str]:
    meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    return meta.get("role") if isinstance(meta, dict) else None


def label_features(values: Any = ()) -> pd.DataFrame:
    """A features table with the categorical ``label`` column (positive / negative)."""
    return pd.DataFrame({"label": pd.Categorical(list(values), categories=list(POINT_LABELS))})


def style_prompt_points(points: Points) -> None:
    """Make ``points`` a prompt layer: a ``label`` feature (missing values: positive) shown green / red.

    Existing points and other features are kept.
    """
    features = points.features
    if "label" not in features or not set(features["label"].dropna().astype(str)) <= set(POINT_LABELS):
        values = [POSITIVE] * len(points.data)
        if "label" in features:
            values = [v if v in POINT_LABELS else POSITIVE for v in features["label"].astype(str)]
        features = features.copy()
        features["label"] = pd.Categorical(values, categories=list(POINT_LABELS))
        points.features = features
    points.feature_defaults = {**{k: v[0] for k, v in points.feature_defaults.items()}, "label": POSITIVE}
    points.face_color_cycle = POINT_COLORS
    points.border_color_cycle = POINT_COLORS
    points.face_color = "label"
    points.border_color = "label"


def make_points_layer(viewer: Any, image: Image) -> Points:
    """Add an empty prompt Points layer on ``image`` ("<image> SAM points")."""
    ndim = len(spatial_shape(image))
    layer = Points(
        np.zeros((0, ndim)),
        ndim=ndim,
        name=f"{image.name} SAM points",
        features=label_features(),
        face_color="label",
        face_color_cycle=POINT_COLORS,
        border_color="label",
        border_color_cycle=POINT_COLORS,
        size=max(4.0, 0.015 * max(spatial_shape(image)[-2:])),
        out_of_slice_display=False,
        **transform_kwargs(image),
    )
    layer.feature_defaults = {"label": POSITIVE}
    return _tag(viewer.add_layer(layer), "points", image)


def make_boxes_layer(viewer: Any, image: Image) -> Shapes:
    """Add an empty box-prompt Shapes layer on ``image`` ("<image> SAM boxes")."""
    ndim = len(spatial_shape(image))
    layer = Shapes(
        ndim=ndim,
        name=f"{image.name} SAM boxes",
        edge_color="#00ffff",
        face_color="transparent",
        edge_width=max(1.0, 0.004 * max(spatial_shape(image)[-2:])),
        **transform_kwargs(image),
    )
    return _tag(viewer.add_layer(layer), "boxes", image)


def make_labels_layer(viewer: Any, image: Image, role: str, name: str, **kwargs: Any) -> Labels:
    """Add an empty Labels layer of the image's spatial shape, aligned with it."""
    data = np.zeros(spatial_shape(image), dtype=LABEL_DTYPE)
    layer = Labels(data, name=f"{image.name} {name}", **transform_kwargs(image), **kwargs)
    return _tag(viewer.add_layer(layer), role, image)


def current_slice(viewer: Any, image: Image) -> SliceSpec:
    """The 2-D slice of ``image`` that the viewer shows now.

    Raises:
        ValueError: 3-D display (SAM segments one 2-D slice at a time) or fewer than two
            displayed axes on the image.
    """
    if viewer.dims.ndisplay != 2:
        raise ValueError("Switch the viewer to 2-D display: Segment Anything works on one 2-D slice at a time.")
    shape = spatial_shape(image)
    ndim = len(shape)
    offset = viewer.dims.ndim - ndim
    displayed = [axis - offset for axis in viewer.dims.displayed if axis - offset >= 0]
    if len(displayed) < 2:
        raise ValueError(f"Image layer {image.name!r} has fewer than two displayed axes.")
    world = np.asarray(viewer.dims.point, dtype=np.float64)[offset:]
    position = np.asarray(image.world_to_data(world), dtype=np.float64)[-ndim:]
    return SliceSpec.from_position(shape, displayed, position)


def _same_frame(layer: Any, image: Image) -> bool:
    if layer.ndim != image.ndim:
        return False
    return all(
        np.allclose(np.asarray(getattr(layer, name)), np.asarray(getattr(image, name)))
        for name in ("scale", "translate", "rotate", "shear")
    ) and np.allclose(layer.affine.affine_matrix, image.affine.affine_matrix)


def to_image_frame(layer: Any, image: Image, coords: np.ndarray) -> np.ndarray:
    """Convert N x ndim data positions of ``layer`` into ``image``'s data frame (via world)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, layer.ndim)
    if _same_frame(layer, image):
        return coords
    out = [np.asarray(image.world_to_data(layer.data_to_world(c)), dtype=np.float64)[-image.ndim :] for c in coords]
    return np.asarray(out, dtype=np.float64).reshape(-1, image.ndim)


def prompt_points(points: Optional[Points], image: Image) -> tuple[np.ndarray, list[str]]:
    """Points and their labels in the image's data frame (N x ndim, N labels)."""
    if points is None or len(points.data) == 0:
        return np.zeros((0, image.ndim)), []
    if "label" in points.features:
        labels = [str(v) if str(v) in POINT_LABELS else POSITIVE for v in points.features["label"]]
    else:
        labels = [POSITIVE] * len(points.data)
    return to_image_frame(points, image, points.data), labels


def prompt_boxes(shapes: Optional[Shapes], image: Image) -> list[np.ndarray]:
    """Every shape's vertices in the image's data frame (each contributes its bounding box)."""
    if shapes is None:
        return []
    return [to_image_frame(shapes, image, vertices) for vertices in shapes.data]
