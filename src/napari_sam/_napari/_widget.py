"""The "Segment Anything" dock widget: thin wiring between napari layers and the core.

All segmentation logic lives in :mod:`napari_sam.interactive`; this module builds the
controls, listens to layer events, runs the engine in napari thread workers and writes results
into layers.

Keys (bound on the viewer and on the prompt layers; see the README):

* ``C``: commit the current object(s) into the output Labels layer (next free ids)
* ``Shift-C``: clear the prompts on the current slice
* ``T``: toggle the polarity of new points (in select mode: also flip the selected points)
* ``Shift`` + click in the Points layer's add mode: add a negative point
* ``U`` / ``Shift-U``: undo / redo the last commit (napari's own Ctrl-Z / Ctrl-Shift-Z on
  the output Labels layer undo commits too: every commit is recorded in its history)
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable, Optional

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning

if TYPE_CHECKING:
    import napari.viewer
from qtpy.QtCore import QObject, QTimer, Signal

from ..interactive.engine import SamEngine, SlicePlane, TileProgress, TilingChoice, display_rgb, store_plane_index
from ..interactive.prompts import ObjectPrompt, SliceSpec
from ..interactive.volume_object import StackSlices, precompute_steps, propagate_object_steps, propagation_axis
from . import _layers
from ._model_picker import ModelPicker
from ._prompt_layers import flip_selected_points, polarity, read_prompts, remove_prompts_on_slice, shift_pressed
from ._objects import (
    CURRENT_NAME, OUTPUT_NAME, CurrentObject, commit_objects, commit_volume_object, redo_commit, undo_commit,
)
from ._errors import describe_error
from ._session import session_for, unwrap_viewer
from ._status import StatusArea, add_full_width
from ._tiling_controls import TilingControls

_logger = logging.getLogger(__name__)

DEBOUNCE_MS = 120
NEW_LAYER = "(new layer)"
HINTS = (
    "<b>Points</b>: click to add a positive point, <b>Shift</b>+click (or <b>T</b>) for negative.<br>"
    "<b>Boxes</b>: draw rectangles (one object per box).<br>"
    "<b>C</b> commit &nbsp; <b>Shift-C</b> clear prompts &nbsp; <b>U</b> / <b>Shift-U</b> undo / redo commit<br>"
    "<b>V</b> segment the current object through the stack (or time-lapse) and commit it"
)

_WIDGETS: "weakref.WeakValueDictionary[int, SamWidget]" = weakref.WeakValueDictionary()


def widget_for(viewer: Any) -> Optional["SamWidget"]:
    """The Segment Anything widget opened on ``viewer``, if any."""
    return _WIDGETS.get(id(unwrap_viewer(viewer)))


class _DownloadRelay(QObject):
    """Carries download progress from a worker thread to the GUI thread (a queued Qt signal)."""

    progressed = Signal(object, object)

    def __call__(self, done: int, total: Optional[int]) -> None:
        self.progressed.emit(done, total)


@dataclass
class _Request:
    """A snapshot of everything one computation needs (taken on the GUI thread)."""

    id: int
    image: Image
    data: Any
    rgb: bool
    spec: SliceSpec
    contrast_limits: Optional[tuple[float, float]]
    data_key: Hashable
    objects: list[ObjectPrompt] = field(default_factory=list)
    tiling: TilingChoice = field(default_factory=TilingChoice)
    store_path: Optional[str] = None
    on_mismatch: str = "error"
    #: set by :func:`compute` when the slice was tiled: (tile_shape, halo, number of tiles)
    tiled: Optional[tuple[tuple[int, int], tuple[int, int], int]] = None

    def cache_key(self, engine: SamEngine) -> Hashable:
        return engine.cache_key(self.data_key, self.spec.key, self.contrast_limits)

    def plan(self, model: Any) -> Optional[tuple[tuple[int, int], tuple[int, int]]]:
        """(tile_shape, halo) when this request is tiled (or uses a store) with ``model``, else None."""
        return self.tiling.resolve(self.spec.plane_shape, model.image_encoder.img_size, self.store_path is not None)


def compute(engine: SamEngine, request: _Request, download_progress: Any = None):
    """Worker body: load the model if needed, embed the slice unless cached, predict.

    A generator: yields ``(done, total)`` progress during the embedding (a
    :class:`~napari_sam.interactive.engine.TileProgress` per encoder step of a tile when the
    slice is tiled); returns ``(request, masks)``. Runs on a worker thread; touches no layer.

    A tiled slice (or one with an embeddings store) goes through
    :meth:`~napari_sam.interactive.engine.SamEngine.tiled_prediction_steps`: only the tiles that
    the prompts need are embedded (none without prompts; the store is checked meanwhile).
    """
    engine.adopt_thread_settings()
    if engine.needs_loading:
        engine.ensure_model(download_progress)
    key = request.cache_key(engine)
    plan = request.plan(engine.ensure_model())
    if plan is not None:
        tile_shape, halo = plan
        plane_index = store_plane_index(request.spec) if request.store_path else 0
        store = (engine.embedding_store(request.store_path, tile_shape, halo, request.on_mismatch)
                 if request.store_path else None)
        plane = SlicePlane(request.data, request.spec, request.rgb)
        masks = yield from engine.tiled_prediction_steps(
            plane, request.objects, tile_shape, halo, contrast_limits=request.contrast_limits, store=store,
            plane_index=plane_index, cache_key=key,
        )
        request.tiled = (tile_shape, halo, _tile_count(request.spec.plane_shape, tile_shape, halo))
        return request, masks
    embedding = engine.cache.get(key)
    if embedding is None:
        plane = request.spec.take(request.data, rgb=request.rgb)
        rgb = display_rgb(plane, request.contrast_limits, request.rgb)
        embedding = yield from engine.embedding_steps(rgb)
        engine.cache.put(key, embedding)
    masks = engine.predict_objects(embedding, request.objects) if request.objects else []
    return request, masks


def _tile_count(plane_shape: tuple[int, int], tile_shape: tuple[int, int], halo: tuple[int, int]) -> int:
    from ..tiling import TileGrid

    return len(TileGrid(plane_shape, tile_shape, halo))


class SamWidget(Container):
    """Dock widget: choose image, model and layers; prompts re-run SAM on the current slice.

    Args:
        napari_viewer: the viewer (npe2 passes it by type annotation).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = unwrap_viewer(napari_viewer)
        self.session = session_for(self.viewer)
        self._ids = itertools.count(1)
        self._latest_id = 0
        self._worker: Any = None
        self._running: Optional[_Request] = None
        self._pending: Optional[_Request] = None
        self._commit_when_ready = False
        self._outcome_shown = False
        self._ensuring = False
        self._resetting = False
        self._negative_mode = False
        self._current = CurrentObject(self.viewer, on_layer_created=self._reset_layer_choices)
        self._last_outside = 0
        self._connected: list[tuple[Any, Any]] = []
        self._image_connected: Optional[Image] = None
        self._hooked_points: "weakref.WeakSet[Points]" = weakref.WeakSet()

        self._image_combo = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self._status = StatusArea("Choose an image layer and add prompts.")
        self._picker = ModelPicker(self.session, self._show_model_error)
        self._tiling = TilingControls(on_change=self.schedule)
        self._points_combo = ComboBox(label="Points", choices=self._points_choices)
        self._boxes_combo = ComboBox(label="Boxes", choices=self._shapes_choices)
        self._output_combo = ComboBox(label="Output", choices=self._labels_choices)
        self._commit_btn = PushButton(text="Commit object [C]")
        self._clear_btn = PushButton(text="Clear prompts [Shift-C]")
        self._undo_btn = PushButton(text="Undo commit [U]")
        self._redo_btn = PushButton(text="Redo commit [Shift-U]")
        self._volume_btn = PushButton(text=VOLUME_TEXT)
        self._volume_btn.tooltip = (
            "Segment the current object on every slice of the stack (or every frame of a time-lapse) "
            "from this slice's result, and commit it as one object (one undo step)."
        )
        self._volume_worker: Any = None
        self._precompute_btn = PushButton(text=PRECOMPUTE_TEXT)
        self._precompute_btn.tooltip = (
            "Compute the image embedding of every slice along the slider axis now, in the background "
            "(kept in the embedding cache while it has room)."
        )
        self._precompute_worker: Any = None
        self._hints = Label(value=HINTS)
        self.extend(
            [
                self._image_combo,
                *self._picker.widgets,
                *self._tiling.widgets,
                self._points_combo,
                self._boxes_combo,
                self._output_combo,
                Container(widgets=[self._commit_btn, self._clear_btn], layout="horizontal", labels=False),
                Container(widgets=[self._undo_btn, self._redo_btn], layout="horizontal", labels=False),
                Container(widgets=[self._volume_btn, self._precompute_btn], layout="horizontal", labels=False),
                self._hints,
            ]
        )
        add_full_width(self, self._status)
        self._hints.native.setWordWrap(True)

        self._closed = False
        self._relay = _DownloadRelay(self.native)
        self._relay.progressed.connect(self._on_download_progress)
        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.request_prediction)
        self._raise_timer = QTimer(self.native)  # prompt layers back on top, after the event that moved them
        self._raise_timer.setSingleShot(True)
        self._raise_timer.setInterval(0)
        self._raise_timer.timeout.connect(self.raise_prompt_layers)
        self._started_model_version = -1

        self._image_combo.changed.connect(self._on_image_changed)
        self._connected.append((None, self.session.on_model_changed(self._on_model_changed)))
        self._points_combo.changed.connect(self._on_prompt_layers_changed)
        self._boxes_combo.changed.connect(self._on_prompt_layers_changed)
        self._commit_btn.changed.connect(self.commit)
        self._clear_btn.changed.connect(self.clear_prompts)
        self._undo_btn.changed.connect(self.undo)
        self._redo_btn.changed.connect(self.redo)
        self._volume_btn.changed.connect(self.segment_in_volume)
        self._precompute_btn.changed.connect(self.precompute_stack)

        layers = self.viewer.layers
        for emitter in (layers.events.inserted, layers.events.removed, layers.events.moved):
            self._listen(emitter, self._reset_layer_choices)
        self._listen(layers.events.inserted, self._on_layer_inserted)
        self._listen(self.viewer.dims.events.current_step, self._on_slice_changed)
        self._listen(self.viewer.dims.events.ndisplay, self._on_slice_changed)
        self._bind_keys(self.viewer)
        self.native.destroyed.connect(self._disconnect_all)
        _WIDGETS[id(self.viewer)] = self
        if self._image_combo.value is None:
            self._image_combo.value = self._default_image()
        else:
            self._on_image_changed(self._image_combo.value)

    # -- plumbing -----------------------------------------------------------------------------
    def _listen(self, emitter: Any, callback: Any) -> None:
        emitter.connect(callback)
        self._connected.append((emitter, callback))

    def _default_image(self) -> Optional[Image]:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image):
            return active
        images = self._image_choices()
        return images[-1] if images else None

    def _image_choices(self, *_: Any) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _points_choices(self, *_: Any) -> list[Any]:
        return [(NEW_LAYER, None)] + [(l.name, l) for l in self.viewer.layers if isinstance(l, Points)]

    def _shapes_choices(self, *_: Any) -> list[Any]:
        return [(NEW_LAYER, None)] + [(l.name, l) for l in self.viewer.layers if isinstance(l, Shapes)]

    def _labels_choices(self, *_: Any) -> list[Any]:
        current = self.current_layer
        return [(NEW_LAYER, None)] + [
            (l.name, l) for l in self.viewer.layers if isinstance(l, Labels) and l is not current
        ]

    def _reset_layer_choices(self, event: Any = None) -> None:
        if self._closed:
            return None
        self._resetting = True  # a removed layer is not a request for a new one
        try:
            for combo in (self._image_combo, self._points_combo, self._boxes_combo, self._output_combo):
                combo.reset_choices()
        finally:
            self._resetting = False

    def _on_layer_inserted(self, event: Any = None) -> None:
        if not self._closed and isinstance(getattr(event, "value", None), Labels):
            self._raise_timer.start()  # not inside napari's own handling of the insertion

    def raise_prompt_layers(self) -> bool:
        """Move the prompt layers above every Labels layer (masks would hide points and boxes)."""
        if self._closed:
            return False
        return _layers.raise_prompt_layers(self.viewer, [self.points_layer, self.shapes_layer])

    def _disconnect_all(self, *_: Any) -> None:
        """Stop listening to napari and drop pending work (the Qt widget is going away)."""
        self._closed = True
        self._raise_timer.stop()
        self.cancel()
        for emitter, callback in self._connected:
            try:
                callback() if emitter is None else emitter.disconnect(callback)  # None: a disconnect function
            except (TypeError, ValueError, RuntimeError):
                pass
        self._connected.clear()
        if _WIDGETS.get(id(self.viewer)) is self:
            del _WIDGETS[id(self.viewer)]

    def close(self) -> None:
        self._timer.stop()
        self._disconnect_all()
        super().close()

    def cancel(self) -> None:
        """Stop the running computations (at their next yield) and drop the pending one."""
        self._pending = None
        if self._worker is not None:
            self._worker.quit()
        for worker in (self._volume_worker, self._precompute_worker):
            if worker is not None:
                worker.quit()

    # -- selected layers ----------------------------------------------------------------------
    @property
    def image_layer(self) -> Optional[Image]:
        return self._image_combo.value

    @property
    def points_layer(self) -> Optional[Points]:
        return self._points_combo.value

    @property
    def shapes_layer(self) -> Optional[Shapes]:
        return self._boxes_combo.value

    @property
    def output_layer(self) -> Optional[Labels]:
        return self._output_combo.value

    @property
    def current_layer(self) -> Optional[Labels]:
        image = self.image_layer
        return None if image is None else _layers.find_layer(self.viewer, "current", image)

    def _on_image_changed(self, image: Optional[Image]) -> None:
        if self._image_connected is not None:
            for emitter, callback in list(self._connected):
                if getattr(emitter, "source", None) is self._image_connected:
                    emitter.disconnect(callback)
                    self._connected.remove((emitter, callback))
        self._image_connected = image
        self._current = CurrentObject(self.viewer, on_layer_created=self._reset_layer_choices)
        if image is None:
            return
        self._listen(image.events.contrast_limits, self.schedule)
        self._listen(image.events.data, self._on_image_data)
        self.ensure_layers(image)
        self.schedule()

    def ensure_layers(self, image: Image) -> None:
        """Select (or create) the prompt, current-object and output layers for ``image``."""
        find = _layers.find_layer
        viewer = self.viewer
        self._ensuring = True
        try:
            self._ensure_layers(image, find, viewer)
        finally:
            self._ensuring = False
        self._on_prompt_layers_changed()
        self.viewer.layers.selection.active = self.points_layer
        self.points_layer.mode = "add"

    def _ensure_layers(self, image: Image, find: Any, viewer: Any) -> None:
        # Labels first, prompts above them (existing prompt layers are raised after the event).
        output = find(viewer, "output", image) or _layers.make_labels_layer(viewer, image, "output", OUTPUT_NAME)
        if find(viewer, "current", image) is None:
            _layers.make_labels_layer(viewer, image, "current", CURRENT_NAME, opacity=0.6)
        points = find(viewer, "points", image) or _layers.make_points_layer(viewer, image)
        boxes = find(viewer, "boxes", image) or _layers.make_boxes_layer(viewer, image)
        self._reset_layer_choices()
        self._points_combo.value = points
        self._boxes_combo.value = boxes
        self._output_combo.value = output

    def _on_prompt_layers_changed(self, _: Any = None) -> None:
        image = self.image_layer
        if image is None:
            return
        if self._ensuring:
            return
        if self._resetting:
            self.schedule()
            return
        if self._points_combo.value is None:
            self._points_combo.value = _layers.make_points_layer(self.viewer, image)
            return
        if self._boxes_combo.value is None:
            self._boxes_combo.value = _layers.make_boxes_layer(self.viewer, image)
            return
        points, boxes = self.points_layer, self.shapes_layer
        if points is not None and points not in self._hooked_points:
            _layers.style_prompt_points(points)
            points.mouse_drag_callbacks.insert(0, self._on_points_press)
            self._bind_keys(points)
            self._listen(points.events.data, self._on_prompts_changed)
            self._hooked_points.add(points)
        if boxes is not None and not getattr(boxes, "_napari_sam_hooked", False):
            self._bind_keys(boxes)
            self._listen(boxes.events.data, self._on_prompts_changed)
            boxes._napari_sam_hooked = True  # noqa: SLF001 - our own marker attribute
        self.schedule()

    def _on_image_data(self, event: Any = None) -> None:
        if self.image_layer is not None:
            self.schedule()  # the session's data key changes with the data: a new embedding

    # -- model ----------------------------------------------------------------------------------
    @property
    def engine(self) -> SamEngine:
        """The viewer's model, embedding cache and predictions (shared through the session)."""
        return self.session.engine

    def set_model(self, model: Any) -> None:
        """Use an already built ``Sam`` module (e.g. from a script), for every widget of the viewer."""
        self.session.use_model(model)

    def _show_model_error(self, message: str) -> None:
        self._status.show_error(message)

    def _on_model_changed(self) -> None:
        if self._closed:
            return
        spec = self.engine.spec
        self._status.value = f"Model: {spec.label} (loads on first use)." if spec is not None else "Model set."
        self.schedule()

    # -- events ---------------------------------------------------------------------------------
    def schedule(self, event: Any = None) -> None:
        """Ask for a new prediction after a short quiet period (debounced)."""
        if self._closed:
            return None
        self._timer.start()

    def _on_slice_changed(self, event: Any = None) -> None:
        self._current.clear(self.image_layer)
        self.schedule()

    def _on_prompts_changed(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "changed"))
        if action.endswith("ing"):  # "adding", "removing", "changing": wait for the result
            return
        points = self.points_layer
        if points is not None and action.endswith("added"):
            points.feature_defaults = {"label": polarity(self._negative_mode)}
        self.schedule()

    def _on_points_press(self, layer: Points, event: Any) -> None:
        """Shift + click in add mode adds a negative point (or a positive one in negative mode)."""
        if layer.mode != "add":
            return
        layer.feature_defaults = {"label": polarity(shift_pressed(event) != self._negative_mode)}

    # -- requests and workers -------------------------------------------------------------------
    def make_request(self) -> Optional[_Request]:
        """Snapshot the current slice and prompts; None (with a message) when not possible."""
        image = self.image_layer
        if image is None:
            self._status.value = "No image layer: open an image first."
            return None
        try:
            spec, prompts = read_prompts(self.viewer, image, self.points_layer, self.shapes_layer)
        except ValueError as error:
            show_warning(str(error))
            return None
        if prompts.n_outside and prompts.n_outside != self._last_outside:
            show_warning(f"{prompts.n_outside} prompt(s) outside the image were ignored.")
        self._last_outside = prompts.n_outside
        limits = tuple(float(v) for v in image.contrast_limits)
        try:
            tiling = self._tiling.choice()
        except ValueError as error:
            self._status.show_error(str(error))
            return None
        return _Request(
            next(self._ids), image, _layers.image_array(image), image.rgb, spec, limits, self.session.data_key(image),
            prompts.objects, tiling, self._tiling.store_path, self._tiling.on_mismatch,
        )

    @property
    def tiling(self) -> TilingControls:
        """The tiling and embeddings-store controls (``tiling.set(mode=..., store=...)`` from scripts)."""
        return self._tiling

    def request_prediction(self) -> Optional[_Request]:
        """Start (or queue) the computation for the current prompts; returns the request."""
        if self._closed:
            return None
        self._timer.stop()
        if not self.session.has_model:
            self._status.value = "Choose a model first."
            return None
        request = self.make_request()
        if request is None:
            return None
        self._latest_id = request.id
        if self._worker is None:
            self._start(request)
        else:
            self._pending = request
            running = self._running
            if running is not None and running.cache_key(self.engine) != request.cache_key(self.engine):
                self._worker.quit()  # stale embedding: stop at the next encoder block
        return request

    def _start(self, request: _Request) -> None:
        if self.engine.needs_loading:
            spec = self.engine.spec
            self._status.value = f"Loading {spec.label if spec is not None else 'the model'}..."
            self._outcome_shown = False
        elif request.plan(self.engine.model) is None and request.cache_key(self.engine) not in self.engine.cache:
            self._status.value = "Computing the image embedding..."
            self._outcome_shown = False
        self._started_model_version = self.session.model_version
        # Progress goes to the widget's status line, not to a napari ``progress`` bar: that
        # bar shows an animated activity indicator whose repaints (the whole window is
        # recomposed through OpenGL while a canvas is visible) cost CPU the embedding needs.
        self._running = request
        self._worker = self.session.run(
            compute, self.engine, request, self._relay, returned=self._on_returned, errored=self._on_errored,
            finished=self._on_finished, yielded=self._on_progress,
        )

    @property
    def worker(self) -> Any:
        """The running napari worker (None when idle)."""
        return self._worker

    @property
    def busy(self) -> bool:
        """A computation is running, queued or about to be scheduled."""
        return self._worker is not None or self._pending is not None or self._timer.isActive()

    def _on_finished(self) -> None:
        self._worker, self._running = None, None
        if self._closed:
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            self._start(pending)

    def _on_progress(self, step: tuple[int, int]) -> None:
        if self._closed:
            return
        if isinstance(step, TileProgress):
            self._status.value = (
                f"Computing the image embedding of tile {step.tile} of {step.tiles}: step {step.done} of {step.total}..."
            )
        else:
            done, total = step
            self._status.value = f"Computing the image embedding: step {done} of {total}..."
        self._outcome_shown = False

    def _on_download_progress(self, done: int, total: Optional[int]) -> None:
        if self._closed:
            return
        size = f"{done / 2**20:.0f} / {total / 2**20:.0f} MiB" if total else f"{done / 2**20:.0f} MiB"
        self._status.value = f"Downloading {self.engine.spec.label if self.engine.spec else 'weights'}: {size}"

    def _on_errored(self, error: BaseException) -> None:
        """The job failed (the session logged it and showed a notification): say so here, and stay usable.

        The queued request is dropped unless the model changed since the job started (it would
        fail the same way); the next prompt, or another model, starts a new job.
        """
        if self._closed:
            return None
        self._commit_when_ready = False
        if self.session.model_version == self._started_model_version:
            self._pending = None
        self._status.show_error(f"Error: {describe_error(error)}")

    def _on_returned(self, result: tuple[_Request, list[np.ndarray]]) -> None:
        if self._closed:
            return None
        request, masks = result
        if request.id != self._latest_id or request.image is not self.image_layer:
            return  # superseded by a newer request
        self._current.show(request.image, request.spec, masks)
        n = len(masks)
        if n:
            self._status.value = f"Current: {n} object(s) from the prompts, not committed yet (C commits)."
            self._outcome_shown = False
        elif not self._outcome_shown:  # the prompts were cleared by a commit: keep saying what it did
            if request.tiled is not None and request.tiled[2] > 1:
                (th, tw), (hy, hx), count = request.tiled
                self._status.value = (
                    f"Tiled: {count} tiles of {th} x {tw} px (halo {hy} px): add points or boxes; "
                    "only the tiles they need are embedded."
                )
            else:
                self._status.value = "Embedding ready: add points or boxes."
        if self._commit_when_ready:
            self._commit_when_ready = False
            self.commit()

    # -- current object and commits ----------------------------------------------------------
    def _ensure_output(self) -> Optional[Labels]:
        layer = self.output_layer
        image = self.image_layer
        if image is None:
            return None
        if layer is None:
            layer = _layers.make_labels_layer(self.viewer, image, "output", OUTPUT_NAME)
            self._reset_layer_choices()
            self._output_combo.value = layer
        if tuple(layer.data.shape) != _layers.spatial_shape(image):
            show_error(
                f"Output Labels layer {layer.name!r} has shape {layer.data.shape}, the image "
                f"{_layers.spatial_shape(image)}: choose another output layer."
            )
            return None
        return layer

    def commit(self, _: Any = None) -> Optional[list[int]]:
        """Commit the current object(s) into the output Labels layer with the next free ids.

        Returns the ids given, or None when nothing was committed (or the commit waits for a
        running prediction and happens when it arrives).
        """
        if self.busy:
            self._commit_when_ready = True
            self._status.value = "Committing when the prediction is ready..."
            return None
        if self._current.spec is None or not self._current.masks:
            self._status.value = "Nothing to commit: add points or a box first."
            return None
        output = self._ensure_output()
        if output is None:
            return None
        try:
            edit = commit_objects(self.session, output, self._current.spec, self._current.masks)
        except ValueError as error:
            show_error(str(error))
            return None
        if edit is None:
            self._status.value = "Nothing new to commit (the pixels already carry labels)."
            return None
        self._show_outcome(f"Committed label(s) {', '.join(map(str, edit.ids))} into {output.name!r}.")
        self.clear_prompts()
        return edit.ids

    # -- the object through the stack --------------------------------------------------------
    @property
    def volume_worker(self) -> Any:
        """The running propagation worker (None when idle)."""
        return self._volume_worker

    def segment_in_volume(self, _: Any = None) -> Any:
        """Propagate the current object from this slice through the stack (or the time-lapse)
        in a background worker and commit it into the output layer as one object (one undo step).

        The axis is the slider last moved, when it is a non-displayed axis, else the last
        non-displayed one. While it runs, the same button (or key) cancels it; a cancelled
        propagation commits nothing. Returns the started worker, or None.
        """
        if self._volume_worker is not None:
            self._volume_worker.quit()
            self._status.value = "Cancelling the propagation..."
            return None
        if self.busy:
            self._status.value = "Wait for the current prediction, then segment the object in the volume."
            return None
        image = self.image_layer
        if image is None or self._current.spec is None or len(self._current.masks) != 1:
            self._status.value = (
                "Segment one object on a slice first (points and/or one box), then segment it in the volume."
            )
            return None
        spec = self._current.spec
        try:
            axis = propagation_axis(spec, self.viewer.dims.last_used)
        except ValueError as error:
            self._status.show_error(str(error))
            return None
        output = self._ensure_output()
        if output is None:
            return None
        limits = tuple(float(v) for v in image.contrast_limits)

        def on_progress(progress: Any) -> None:
            if not self._closed and progress.steps == 0:
                self._status.value = (
                    f"Segmenting the object in the volume: slice {progress.done} of {progress.total} "
                    f"(axis {axis}, at {progress.slice_index})..."
                )

        def on_returned(masks: np.ndarray) -> None:
            if self._closed:
                return
            if output not in self.viewer.layers:
                self._status.show_error("The output Labels layer was removed: nothing committed.")
                return
            edit = commit_volume_object(self.session, output, spec, axis, masks)
            if edit is None:
                self._status.value = "Nothing new to commit (the pixels already carry labels)."
                return
            slices = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
            self._show_outcome(
                f"Committed label {edit.ids[0]} on {len(slices)} slice(s), {slices.min()} to {slices.max()} "
                f"of axis {axis}, into {output.name!r} (U undoes it)."
            )
            self.clear_prompts()

        def on_aborted() -> None:
            if not self._closed:
                self._show_outcome("Propagation cancelled: nothing committed.")

        def on_finished() -> None:
            self._volume_worker = None
            if not self._closed:
                self._volume_btn.text = VOLUME_TEXT

        def on_errored(error: BaseException) -> None:
            if not self._closed:
                self._status.show_error(f"Error: {describe_error(error)}")

        self._status.value = "Segmenting the object in the volume..."
        self._volume_btn.text = "Cancel volume segmentation [V]"
        stack = StackSlices(self.engine, _layers.image_array(image), image.rgb, spec, axis, limits,
                            self.session.data_key(image))
        self._volume_worker = self.session.run(
            propagate_object_steps, stack, self._current.masks[0], task="Segment object in volume",
            yielded=on_progress, returned=on_returned, aborted=on_aborted, errored=on_errored, finished=on_finished,
        )
        return self._volume_worker

    def precompute_stack(self, _: Any = None) -> Any:
        """Compute the embeddings of every slice along the slider axis in the background, so that
        clicks on any slice and **V** need no encoder work; pressing it again stops.

        Returns the started worker, or None.
        """
        if self._precompute_worker is not None:
            self._precompute_worker.quit()
            return None
        image = self.image_layer
        if image is None:
            self._status.value = "No image layer: open an image first."
            return None
        try:
            spec = _layers.current_slice(self.viewer, image)
            axis = propagation_axis(spec, self.viewer.dims.last_used)
        except ValueError as error:
            self._status.show_error(str(error))
            return None
        limits = tuple(float(v) for v in image.contrast_limits)
        stack = StackSlices(self.engine, _layers.image_array(image), image.rgb, spec, axis, limits,
                            self.session.data_key(image))

        def on_progress(progress: tuple[int, int]) -> None:
            if not self._closed:
                self._status.value = f"Embedding the stack: slice {progress[0]} of {progress[1]}..."

        def on_returned(computed: int) -> None:
            if not self._closed:
                self._show_outcome(f"Stack embedded ({computed} new slice embedding(s), axis {axis}).")

        def on_finished() -> None:
            self._precompute_worker = None
            if not self._closed:
                self._precompute_btn.text = PRECOMPUTE_TEXT

        def on_errored(error: BaseException) -> None:
            if not self._closed:
                self._status.show_error(f"Error: {describe_error(error)}")

        self._precompute_btn.text = "Stop embedding the stack"
        self._precompute_worker = self.session.run(
            precompute_steps, stack, task="Embed the stack", yielded=on_progress, returned=on_returned,
            errored=on_errored, finished=on_finished,
        )
        return self._precompute_worker

    def _show_outcome(self, message: str) -> None:
        """Say what an action did; the status keeps it until new prompts give an object or
        an embedding is computed (the prediction that follows a commit does not replace it)."""
        self._status.value = message
        self._outcome_shown = True

    def undo(self, _: Any = None) -> None:
        """Undo the last commit into the output layer."""
        edit = undo_commit(self.session, self.output_layer)
        self._show_outcome(f"Undid label(s) {edit.ids}." if edit else "Nothing to undo.")

    def redo(self, _: Any = None) -> None:
        """Redo the last undone commit."""
        edit = redo_commit(self.session, self.output_layer)
        self._show_outcome(f"Redid label(s) {edit.ids}." if edit else "Nothing to redo.")

    def clear_prompts(self, _: Any = None) -> None:
        """Remove the points and boxes on the current slice and the current object."""
        image = self.image_layer
        if image is None:
            return
        try:
            spec = _layers.current_slice(self.viewer, image)
        except ValueError as error:
            show_warning(str(error))
            return
        remove_prompts_on_slice(image, spec, self.points_layer, self.shapes_layer)
        self._current.clear(self.image_layer)

    def toggle_polarity(self, _: Any = None) -> None:
        """Switch new points between positive and negative.

        In the Points layer's select mode, the selected points are flipped too (in add mode
        napari keeps the last added point selected, so nothing is flipped there).
        """
        self._negative_mode = not self._negative_mode
        label = polarity(self._negative_mode)
        points = self.points_layer
        if points is not None:
            if flip_selected_points(points):
                self.schedule()
            points.feature_defaults = {"label": label}
        self._status.value = f"New points are {label}."
        show_info(f"Segment Anything: new points are {label}.")

    # -- keys -----------------------------------------------------------------------------------
    def _bind_keys(self, target: Any) -> None:
        ref = weakref.ref(self)

        def call(method: str):
            def handler(_: Any = None) -> None:
                widget = ref()
                if widget is not None:
                    getattr(widget, method)()

            handler.__doc__ = f"Segment Anything: {method.replace('_', ' ')}"
            return handler

        for key, method in KEYS.items():
            target.bind_key(key, call(method), overwrite=True)


KEYS = {
    "C": "commit",
    "Shift-C": "clear_prompts",
    "T": "toggle_polarity",
    "U": "undo",
    "Shift-U": "redo",
    "V": "segment_in_volume",
}
VOLUME_TEXT = "Segment object in volume [V]"
PRECOMPUTE_TEXT = "Embed the whole stack"
