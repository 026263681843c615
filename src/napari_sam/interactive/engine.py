"""The interactive segmentation engine: one model, a bounded embedding cache, predictions.

Qt-free and napari-free: the napari session drives it from thread workers, ``napari_sam.segment``
and tests drive it synchronously.

* :class:`EmbeddingCache` keeps image embeddings keyed by (layer data identity and version,
  slice, display mapping, model), least recently used first out, bounded in bytes.
* :class:`SamEngine` holds the model chosen by a :class:`~napari_sam.models.ModelSpec` (built
  by the model registry on first use), computes embeddings as generators that yield progress
  after every encoder block (:meth:`napari_sam.SamPredictor.embedding_steps`), and predicts one
  mask per :class:`~napari_sam.interactive.prompts.ObjectPrompt` through
  :meth:`napari_sam.SamPredictor.set_image_embedding`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Generator, Hashable, Optional, Sequence, TypeVar

import numpy as np

from ..models.registry import ModelSpec
from ..utils.image import to_rgb_uint8
from ..utils.labels import paint_masks
from ..utils.progress import drain
from .prompts import ObjectPrompt

if TYPE_CHECKING:
    from ..predictor import ImageEmbedding, SamPredictor

_logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 512 * 2**20  # ~128 vit_b embeddings (1x256x64x64 float32 = 4 MiB each)

ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")


class EmbeddingCache:
    """Least-recently-used cache of :class:`~napari_sam.predictor.ImageEmbedding` objects, bounded in bytes.

    Keys are any hashables; :meth:`SamEngine.cache_key` builds the ones the plugin uses.

    Args:
        max_bytes: evict least recently used embeddings beyond this total size (at least
            the newest one is always kept).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, "ImageEmbedding"] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional["ImageEmbedding"]:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Hashable, embedding: "ImageEmbedding") -> None:
        with self._lock:
            self._items[key] = embedding
            self._items.move_to_end(key)
            while len(self._items) > 1 and self.nbytes > self.max_bytes:
                self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def display_rgb(plane: np.ndarray, contrast_limits: Optional[Sequence[float]], rgb: bool) -> np.ndarray:
    """The slice as napari displays it, as SAM's HxWx3 uint8 RGB input.

    Intensities are mapped linearly from the layer's contrast limits ``(low, high)`` to
    [0, 255] (gamma and colormap are ignored). uint8 data whose contrast limits are the full
    (0, 255) range is passed unchanged, so photos give exactly the reference's input.

    Args:
        plane: HxW (grayscale) or HxWx3 / HxWx4 (``rgb``) slice, any real dtype.
        contrast_limits: the layer's (low, high), or None for robust percentiles.
        rgb: the trailing axis holds colour channels.

    Returns:
        HxWx3 uint8.

    Raises:
        ValueError: a plane of another shape than ``rgb`` says.
    """
    plane = np.asarray(plane)
    if not rgb and plane.ndim != 2:
        raise ValueError(f"Expected a 2-D grayscale slice, got shape {plane.shape}.")
    if rgb and (plane.ndim != 3 or plane.shape[2] not in (3, 4)):
        raise ValueError(f"Expected an HxWx3 or HxWx4 RGB(A) slice, got shape {plane.shape}.")
    limits = None if contrast_limits is None else (float(contrast_limits[0]), float(contrast_limits[1]))
    if plane.dtype == np.uint8 and (limits is None or limits == (0.0, 255.0)):
        return to_rgb_uint8(plane)
    if limits is not None and not limits[1] > limits[0]:
        limits = (limits[0], limits[0] + 1.0)
    if plane.dtype == np.uint8:
        plane = plane.astype(np.float32)
    return to_rgb_uint8(plane, limits)


class SamEngine:
    """One model, its embedding cache, and mask predictions for object prompts.

    Thread use: all model work takes ``self.lock``; one thread at a time computes. The
    embedding generator takes the lock per step, never across a yield. Loading a model
    (a download can take minutes) runs outside the lock, so the GUI thread can choose another
    model meanwhile; a model whose choice was replaced while it loaded is discarded.

    Args:
        spec: the model to load lazily (on first use) or None to set one later.
        model: an already built ``Sam`` module to use instead of loading ``spec``.
        cache_bytes: bound of the embedding cache.
    """

    def __init__(
        self,
        spec: Optional[ModelSpec] = None,
        model: Any = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        import torch

        self.spec = spec
        self.model = model
        self.cache = EmbeddingCache(cache_bytes)
        self.lock = threading.RLock()
        self.embeddings_computed = 0
        self._model_serial = 0 if model is None else 1
        self._choice_serial = 0  # goes up with every set_spec / set_model
        self._predictor: Optional["SamPredictor"] = None
        # torch's intra-op thread count as set in the thread that made the engine; worker
        # threads may start with a different one (napari issue seen in micro-sam #740).
        self.num_threads = torch.get_num_threads()

    # -- model --------------------------------------------------------------------------------
    def set_spec(self, spec: ModelSpec) -> None:
        """Choose another model; it is loaded on next use and the cache is dropped."""
        with self.lock:
            if spec != self.spec or self.model is None:
                self.spec = spec
                self.model = None
                self._predictor = None
                self._choice_serial += 1
                self.cache.clear()

    def set_model(self, model: Any) -> None:
        """Use an already built ``Sam`` module."""
        with self.lock:
            self.model = model
            self.spec = None
            self._predictor = None
            self._model_serial += 1
            self._choice_serial += 1
            self.cache.clear()

    @property
    def needs_loading(self) -> bool:
        return self.model is None

    def ensure_model(self, progress: Optional[ProgressCallback] = None) -> Any:
        """Load the chosen model if needed and return it.

        Args:
            progress: called as ``progress(downloaded_bytes, total_bytes)`` while known weights
                are downloaded.

        The download and build run outside ``self.lock`` (see the class); when another model
        is chosen meanwhile, the loaded one is discarded and the new choice is loaded.

        Raises:
            RuntimeError: no model chosen; and whatever :func:`napari_sam.models.create_model` raises.
        """
        while True:
            with self.lock:
                if self.model is not None:
                    return self.model
                if self.spec is None:
                    raise RuntimeError("No SAM model chosen.")
                spec, choice = self.spec, self._choice_serial
            self.adopt_thread_settings()
            model = spec.load(progress)
            with self.lock:
                if self._choice_serial == choice and self.model is None:
                    self.model = model
                    self._model_serial += 1
                    return model
            # The choice changed while loading (or another thread loaded it): look again.

    def adopt_thread_settings(self) -> None:
        """Give the calling thread the same torch intra-op thread count as the creating thread."""
        import torch

        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    @property
    def precision(self) -> str:
        """The chosen precision ("fp32" for a model set directly)."""
        return self.spec.precision if self.spec is not None else "fp32"

    @property
    def predictor(self) -> "SamPredictor":
        """The predictor of the current model (one per model; its image is set per prediction)."""
        from ..predictor import SamPredictor

        model = self.ensure_model()  # loads outside the lock
        with self.lock:
            if self._predictor is None or self._predictor.model is not model:
                self._predictor = SamPredictor(model, precision=self.precision)
            return self._predictor

    @property
    def model_key(self) -> Hashable:
        return (self.spec, self._model_serial)

    def cache_key(self, data_key: Hashable, slice_key: Hashable, contrast_limits: Any) -> Hashable:
        """Embedding cache key: layer data identity and version, slice, display mapping, model."""
        limits = None if contrast_limits is None else tuple(float(v) for v in contrast_limits)
        return (data_key, slice_key, limits, self.model_key)

    # -- embeddings ---------------------------------------------------------------------------
    def locked(self, steps: Generator[Any, None, T]) -> Generator[Any, None, T]:
        """Run a progress generator's steps one at a time under the engine's lock.

        The lock is taken per step, never across a yield, so model work of other threads
        interleaves between steps and an abandoned generator leaves nothing locked. Closing
        the returned generator closes ``steps``.
        """
        try:
            while True:
                with self.lock:
                    self.adopt_thread_settings()
                    try:
                        progress = next(steps)
                    except StopIteration as stop:
                        return stop.value
                yield progress
        finally:
            steps.close()

    def embedding_steps(self, rgb: np.ndarray) -> Generator[tuple[int, int], None, "ImageEmbedding"]:
        """Compute the image embedding of an HxWx3 uint8 RGB image, block by block.

        Yields ``(steps_done, steps_total)`` (see :meth:`napari_sam.SamPredictor.embedding_steps`)
        and returns the embedding; steps run under the lock (:meth:`locked`).
        """
        self.ensure_model()  # loads outside the lock
        with self.lock:
            self.adopt_thread_settings()
            steps = self.predictor.embedding_steps(rgb)
        embedding = yield from self.locked(steps)
        self.embeddings_computed += 1
        return embedding

    def embed(self, rgb: np.ndarray, key: Optional[Hashable] = None) -> "ImageEmbedding":
        """The embedding of ``rgb`` (HxWx3 uint8), from the cache under ``key`` when there."""
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        embedding = drain(self.embedding_steps(rgb))
        if key is not None:
            self.cache.put(key, embedding)
        return embedding

    # -- predictions --------------------------------------------------------------------------
    def predict_objects(self, embedding: "ImageEmbedding", objects: Sequence[ObjectPrompt]) -> list[np.ndarray]:
        """One HxW bool mask per object (the best of 3 for a single point, else the only one).

        Each object runs through ``SamPredictor.predict`` with ``ObjectPrompt.predict_kwargs``
        on ``embedding`` (no encoder work).
        """
        self.ensure_model()  # loads outside the lock
        with self.lock:
            self.adopt_thread_settings()
            predictor = self.predictor
            if not (predictor.is_image_set and predictor.features is embedding.features):
                predictor.set_image_embedding(embedding)  # keeps the decoder's per-image work otherwise
            masks = []
            for obj in objects:
                out, scores, _ = predictor.predict(**obj.predict_kwargs())
                masks.append(np.asarray(out[int(np.argmax(scores))], dtype=bool))
            return masks


def objects_to_labels(masks: Sequence[np.ndarray], shape: tuple[int, int], dtype: Any = np.uint32) -> np.ndarray:
    """Paint object masks into an HxW label image with ids 1..K (see :func:`napari_sam.utils.labels.paint_masks`)."""
    return paint_masks(masks, shape, dtype=dtype)
