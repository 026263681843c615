"""One segmentation session per viewer: the model choice, the engine (model and embedding
cache), the commit histories and the background workers, shared by the "Segment Anything"
widget, the "Automatic segmentation" widget and ``napari_sam.segment``.

The session is the one place where model work is started on a background thread
(:meth:`SegmentationSession.run`, napari's ``create_worker`` with ``start_thread=False``:
connect, then start), so every widget uses the same idiom and the same model.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Hashable, Optional

from napari.layers import Image, Labels
from napari.qt.threading import create_worker

from ..interactive.engine import SamEngine
from ..interactive.history import CommitHistory
from ..models.registry import ModelSpec
from . import _layers

_logger = logging.getLogger(__name__)

_SESSIONS: "weakref.WeakKeyDictionary[Any, SegmentationSession]" = weakref.WeakKeyDictionary()


def unwrap_viewer(viewer: Any) -> Any:
    """The viewer itself: napari hands plugins a PublicOnlyProxy that wraps every layer anew on
    each access, so layers would lose their identity (caches, histories)."""
    return getattr(viewer, "__wrapped__", viewer)


def session_for(viewer: Any) -> "SegmentationSession":
    """The session of ``viewer``, created on first use."""
    viewer = unwrap_viewer(viewer)
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = SegmentationSession(viewer)
    return session


class SegmentationSession:
    """The state of Segment Anything for one viewer (Qt-free but for the workers it starts).

    Attributes:
        viewer: the napari viewer.
        engine: the model, its embedding cache and predictions (:class:`SamEngine`).
    """

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.engine = SamEngine()
        self._histories: dict[int, CommitHistory] = {}
        self._data_versions: dict[int, int] = {}
        self._listeners: list[Callable[[], None]] = []
        self._workers: set[Any] = set()

    # -- model choice ---------------------------------------------------------------------------
    @property
    def spec(self) -> Optional[ModelSpec]:
        """The chosen model, or None (nothing chosen, or a model module set directly)."""
        return self.engine.spec

    @property
    def has_model(self) -> bool:
        """A model is chosen or set."""
        return self.engine.spec is not None or self.engine.model is not None

    def choose(self, spec: ModelSpec) -> None:
        """Choose the model (loaded on first use); every widget of the viewer follows."""
        if spec != self.engine.spec:
            self.engine.set_spec(spec)
            self._notify()

    def use_model(self, model: Any) -> None:
        """Use an already built ``Sam`` module (e.g. from a script)."""
        self.engine.set_model(model)
        self._notify()

    def on_model_changed(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change of model; returns a function that disconnects it."""
        self._listeners.append(callback)

        def disconnect() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return disconnect

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()

    # -- layer state ------------------------------------------------------------------------------
    def history(self, layer: Labels) -> CommitHistory:
        """The commit history (undo / redo) of an output Labels layer."""
        return self._histories.setdefault(id(layer), CommitHistory())

    def data_key(self, image: Image) -> Hashable:
        """Identity and version of an image layer's data, for the embedding cache; the version
        goes up whenever the layer's data changes."""
        if id(image) not in self._data_versions:
            self._data_versions[id(image)] = 0

            def bump(_: Any = None, key: int = id(image)) -> None:
                self._data_versions[key] = self._data_versions.get(key, 0) + 1

            image.events.data.connect(bump)
        array = _layers.image_array(image)
        return (id(image), id(array), self._data_versions[id(image)], tuple(array.shape), str(array.dtype))

    # -- workers ----------------------------------------------------------------------------------
    def run(self, function: Callable[..., Any], *args: Any, **handlers: Callable[..., Any]) -> Any:
        """Run ``function(*args)`` (a generator function yields progress) on a napari worker thread.

        Args:
            function: the work; touches no layer.
            *args: its arguments.
            **handlers: napari worker signal handlers (``yielded``, ``returned``, ``errored``,
                ``finished``), connected before the worker starts.

        Returns:
            The started worker (``quit()`` stops a generator at its next yield).
        """
        worker = create_worker(function, *args, _connect=handlers, _start_thread=False)
        self._workers.add(worker)  # held until finished, so a running worker is never garbage-collected
        worker.finished.connect(lambda: self._workers.discard(worker))
        worker.start()
        return worker
