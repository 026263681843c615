"""``napari_sam.segment``: the widget's click-and-box segmentation from a script or the console."""

from __future__ import annotations

import os
from typing import Any, Union

from napari.layers import Image, Labels, Points, Shapes

from ..interactive.engine import SamEngine, SlicePlane, TilingChoice, display_rgb, store_plane_index
from ..interactive.volume_object import StackSlices, propagate_object_steps, propagation_axis
from ..models import as_spec
from ..utils.progress import drain
from . import _layers
from ._prompt_layers import read_prompts
from ._objects import OUTPUT_NAME, CurrentObject, commit_objects, commit_volume_object
from ._session import SegmentationSession, session_for
from ._widget import widget_for


def _layer(viewer: Any, layer: Any, kind: type, what: str) -> Any:
    if layer is None or isinstance(layer, kind):
        return layer
    if isinstance(layer, str) and layer in viewer.layers and isinstance(viewer.layers[layer], kind):
        return viewer.layers[layer]
    raise ValueError(f"{what} must be a napari {kind.__name__} layer or its name, got {layer!r}.")


def _store_tiling(store: Any) -> Any:
    """(tile_shape, halo) of an open embedding store, None for a path or no store."""
    if store is None or isinstance(store, (str, os.PathLike)):
        return None
    tile_shape, halo = getattr(store, "tile_shape", None), getattr(store, "halo", None)
    if tile_shape is None or halo is None:
        raise ValueError(f"store must be a path or a napari_sam.EmbeddingStore, got {store!r}.")
    return tuple(int(v) for v in tile_shape), tuple(int(v) for v in halo)


def _engine_for(session: SegmentationSession, model: Any, device: str) -> SamEngine:
    """The session's engine, with ``model`` chosen first when given (every widget of the viewer follows)."""
    from ..predictor import SamPredictor

    if model is None:
        if not session.has_model:
            raise ValueError(
                "No model: pass model= (a registry type such as 'vit_b', a checkpoint path, a Sam module or a "
                "SamPredictor) or choose one in the Segment Anything widget."
            )
        return session.engine
    if isinstance(model, SamPredictor):
        model = model.model
    spec = as_spec(model, device)
    if spec is None:  # a Sam module
        if session.engine.model is not model:
            session.use_model(model)
    else:
        session.choose(spec)
    return session.engine


def segment(
    viewer: Any = None,
    image_layer: Union[Image, str, None] = None,
    points_layer: Union[Points, str, None] = None,
    shapes_layer: Union[Shapes, str, None] = None,
    model: Any = None,
    *,
    labels_layer: Union[Labels, str, None] = None,
    device: str = "auto",
    commit: bool = True,
    volume: bool = False,
    tiling: str = "auto",
    store: Any = None,
) -> Labels:
    """Segment the objects prompted on the current slice, synchronously, and return the Labels.

    The same code as the "Segment Anything" widget, for scripts and the napari console. Points
    (feature ``label``: "positive" / "negative"; all positive without it) and shapes (each
    shape's bounding box is one box prompt, one object per box) are read on the slice the viewer
    shows, in the image layer's data frame (layers with other transforms are mapped through
    world coordinates).

    Args:
        viewer: the napari viewer; default ``napari.current_viewer()``.
        image_layer: the image (layer or name); default the widget's image, else the selected
            image layer, else the top image layer.
        points_layer: the point prompts; default the widget's / plugin's points layer of the image.
        shapes_layer: the box prompts; default the widget's / plugin's boxes layer of the image.
        model: a registry type (``napari_sam.models.model_types()``, e.g. "vit_b"), a checkpoint
            path, a ``napari_sam.modeling.Sam`` or a ``SamPredictor``; default the viewer's
            model (the one chosen in the widgets). A model given here becomes the viewer's
            model: the widgets follow (one model in memory per viewer).
        labels_layer: where to commit; default the widget's output layer, else the plugin's
            "<image> SAM labels" layer (created, aligned with the image, when missing).
        device: torch device for a ``model`` given by name or path ("auto", "cpu", "cuda", "mps").
        commit: write the objects into ``labels_layer`` with the next free ids (undoable from the
            widget when it is open, and always through napari's Labels history); False: write them
            (ids 1..K) into the "current object" layer instead and return that layer.
        volume: segment the prompted object (exactly one) through the stack or time-lapse:
            propagated from the current slice along the last-moved (or last) slider axis
            (:mod:`napari_sam.volume`), committed as one object with one id (needs
            ``commit=True``). The propagation embeds whole slices (untiled).
        tiling: "auto" (tile a slice whose long side exceeds 1.5x the model's input size),
            "on" or "off", as the widgets' "Tiling" setting; each object is predicted from the
            one tile its prompt needs (:class:`napari_sam.TiledPredictor`), embedded at the
            model's input size with a halo of an eighth, through the viewer's embedding cache.
        store: an embeddings store: the path of a ``.zarr`` folder (opened for the model and
            the tiling, created when missing) or an open :class:`napari_sam.EmbeddingStore`
            (its tile shape and halo are used); embeddings are read from it when present and
            written to it when computed. With tiling off, the store holds each slice as one
            tile. Slices of a stack are its planes over the last two axes (index in C order).

    Returns:
        The Labels layer that received the objects.

    Raises:
        ValueError: no viewer, no image layer, no prompts on the current slice, a 3-D view, a
            bad layer argument or no model; with ``volume``: not one object, or no slices; an
            unknown ``tiling``; a store with a view other than the last two axes.
        napari_sam.StoreMismatchError: the store holds another model's, tiling's or image's
            embeddings (a ValueError).
        FileNotFoundError, napari_sam.CheckpointError, RuntimeError: the model cannot be loaded.
    """
    if viewer is None:
        import napari

        viewer = napari.current_viewer()
        if viewer is None:
            raise ValueError("No napari viewer: pass viewer= or open napari first.")
    widget = widget_for(viewer)
    image = _layer(viewer, image_layer, Image, "image_layer")
    if image is None and widget is not None:
        image = widget.image_layer
    if image is None:
        active = viewer.layers.selection.active
        images = [layer for layer in viewer.layers if isinstance(layer, Image)]
        image = active if isinstance(active, Image) else (images[-1] if images else None)
    if image is None:
        raise ValueError("No image layer: add an image to the viewer or pass image_layer=.")
    same_image = widget is not None and widget.image_layer is image
    points = _layer(viewer, points_layer, Points, "points_layer")
    if points is None:
        points = widget.points_layer if same_image else _layers.find_layer(viewer, "points", image)
    shapes = _layer(viewer, shapes_layer, Shapes, "shapes_layer")
    if shapes is None:
        shapes = widget.shapes_layer if same_image else _layers.find_layer(viewer, "boxes", image)

    spec, prompts = read_prompts(viewer, image, points, shapes)
    if not prompts.objects:
        raise ValueError(
            f"No prompts on the current slice of {image.name!r}: add positive points or boxes "
            f"({prompts.n_outside} prompt(s) lay outside the image)."
        )
    choice = TilingChoice(tiling)
    session = session_for(viewer)
    engine = _engine_for(session, model, device)
    limits = tuple(float(v) for v in image.contrast_limits)
    array = _layers.image_array(image)
    key = engine.cache_key(session.data_key(image), spec.key, limits)
    plan = _store_tiling(store) or choice.resolve(spec.plane_shape, engine.input_size, store is not None)
    if plan is not None:
        tile_shape, halo = plan
        opened = store
        if store is not None and isinstance(store, (str, os.PathLike)):
            opened = engine.embedding_store(store, tile_shape, halo)
        plane_index = store_plane_index(spec) if store is not None else 0
        masks = drain(engine.tiled_prediction_steps(
            SlicePlane(array, spec, image.rgb), prompts.objects, tile_shape, halo, contrast_limits=limits,
            store=opened, plane_index=plane_index, cache_key=key,
        ))
    else:
        embedding = engine.cache.get(key)
        if embedding is None:
            rgb = display_rgb(spec.take(array, rgb=image.rgb), limits, image.rgb)
            embedding = engine.embed(rgb, key)
        masks = engine.predict_objects(embedding, prompts.objects)
    if volume:
        if not commit or len(masks) != 1:
            raise ValueError(
                f"volume=True segments one object (got {len(masks)} from the prompts) and commits it (commit=True)."
            )
        axis = propagation_axis(spec, viewer.dims.last_used)
        stack = StackSlices(engine, array, image.rgb, spec, axis, limits, session.data_key(image))
        masks = drain(propagate_object_steps(stack, masks[0]))

    if not commit:
        return CurrentObject(viewer).show(image, spec, masks)

    target = _layer(viewer, labels_layer, Labels, "labels_layer")
    if target is None:
        target = widget.output_layer if same_image else _layers.find_layer(viewer, "output", image)
    if target is None:
        target = _layers.make_labels_layer(viewer, image, "output", OUTPUT_NAME)
        _layers.raise_prompt_layers(viewer, [points, shapes])  # masks must not hide the prompts
    if volume:
        commit_volume_object(session, target, spec, axis, masks)
    else:
        commit_objects(session, target, spec, masks)
    return target
