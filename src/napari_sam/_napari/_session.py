"""One segmentation session per viewer: the model choice, the engine (model and embedding
cache), the commit histories and the background workers, shared by the "Segment Anything"
widget, the "Automatic segmentation" widget and ``napari_sam.segment``.

The session is the one place where model work is started on a background thread
(:meth:`SegmentationSession.run`, napari's ``create_worker`` with ``start_thread=False``:
connect, then start), so every widget uses the same idiom and the same model, and the one
error path: every exception of a job (a failed download, a bad checkpoint, out of memory, a
bug) ends it with ``errored`` then ``finished``, is logged with its traceback and shown as a
napari notification (:func:`~napari_sam._napari._errors.describe_error`).

Why the work is wrapped: superqt's ``GeneratorWorker.work`` returns a ``RuntimeError`` raised
by the generator instead of raising it (it takes it for a deleted Qt object), and
``WorkerBase.run`` then only warns and returns: no ``errored``, no ``finished``, and a widget
waiting for them stays busy for good. ``DownloadError`` and torch's ``OutOfMemoryError`` are
``RuntimeError`` subclasses (so is a ``StopIteration`` raised inside a generator, PEP 479).
The session therefore runs ``function`` inside a wrapper that re-raises any exception as a
:class:`WorkerFailure` (not a ``RuntimeError``), which superqt emits as ``errored``; the
session unwraps it before the caller's ``errored`` handler sees the original exception.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Any, Callable, Hashable, Optional

from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

from ..interactive.engine import SamEngine
from ..interactive.history import CommitHistory
from ..models.registry import ModelSpec
from . import _layers
from ._errors import describe_error, is_out_of_memory

_logger = logging.getLogger(__name__)

_SESSIONS: "weakref.WeakKeyDictionary[Any, SegmentationSession]" = weakref.WeakKeyDictionary()


class WorkerFailure(Exception):
    """An exception raised by a job's function, carried past superqt (see the module docstring).

    Attributes:
        error: the original exception.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a generator function stays one) with every exception raised as :class:`WorkerFailure`."""
    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from function(*args, **kwargs))
            except Exception as error:
                raise WorkerFailure(error) from error

        return generator

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise WorkerFailure(error) from error

    return call


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
        model_version: goes up with every change of model (a job can tell whether the model
            it ran with is still the chosen one).
    """

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.engine = SamEngine()
        self._histories: dict[int, CommitHistory] = {}
        self._data_versions: dict[int, int] = {}
        self._listeners: list[Callable[[], None]] = []
        self._workers: set[Any] = set()
        self.model_version = 0

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
        self.model_version += 1
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
    def run(
        self, function: Callable[..., Any], *args: Any, task: str = "Segment Anything", **handlers: Callable[..., Any]
    ) -> Any:
        """Run ``function(*args)`` (a generator function yields progress) on a napari worker thread.

        Whatever ``function`` raises ends the job: it is logged with its traceback, shown as a
        napari notification ("<task> failed: <message>"), then ``errored`` gets the original
        exception and ``finished`` follows, as after a normal end.

        Args:
            function: the work; touches no layer.
            *args: its arguments.
            task: names the job in the notification.
            **handlers: napari worker signal handlers (``yielded``, ``returned``, ``errored``,
                ``finished``), connected before the worker starts. ``errored`` is called with
                the exception ``function`` raised (a message for it: :func:`describe_error`).

        Returns:
            The started worker (``quit()`` stops a generator at its next yield).
        """
        on_error = handlers.pop("errored", None)
        # _ignore_errors: superqt would also re-raise every error in the GUI thread; the session reports them.
        worker = create_worker(guarded(function), *args, _start_thread=False, _ignore_errors=True)
        # errored before the caller's finished: both are queued from the worker thread in this order.
        worker.errored.connect(functools.partial(self._on_worker_error, task, on_error))
        for name, handler in handlers.items():
            getattr(worker, name).connect(handler)
        self._workers.add(worker)  # held until finished, so a running worker is never garbage-collected
        worker.finished.connect(lambda: self._workers.discard(worker))
        worker.start()
        return worker

    def _on_worker_error(self, task: str, on_error: Optional[Callable[[BaseException], Any]], failure: Any) -> None:
        error = failure.error if isinstance(failure, WorkerFailure) else failure
        _logger.error("%s failed", task, exc_info=(type(error), error, error.__traceback__))
        if is_out_of_memory(error):
            release_cached_memory()
        try:
            if on_error is not None:
                on_error(error)
        finally:
            show_error(f"{task} failed: {describe_error(error)}")


def release_cached_memory() -> None:
    """Give the memory torch's GPU allocators cache back (after running out of memory)."""
    import torch

    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        if mps is not None and torch.backends.mps.is_available():
            mps.empty_cache()
    except Exception as error:  # never let the clean-up hide the original error
        _logger.debug("Could not empty torch's memory cache: %s", error)
