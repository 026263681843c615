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
* Large slices are tiled (:class:`TilingChoice` decides: "auto", "on", "off"):
  :meth:`SamEngine.tiled_prediction_steps` embeds only the tile that answers each object's
  prompt (:class:`napari_sam.TiledPredictor`), through the same cache (keys: the slice's key,
  the tiling, the tile index) and an optional embedding store
  (:meth:`SamEngine.embedding_store`, one :class:`napari_sam.EmbeddingStore` per path, model,
  tile shape and halo).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator, Hashable, NamedTuple, Optional, Sequence, TypeVar

import numpy as np

from ..models.registry import ModelSpec
from ..utils.image import to_rgb_uint8
from ..tiling import as_pair
from ..utils.labels import paint_masks
from ..utils.progress import drain, relabel
from .prompts import ObjectPrompt, SliceSpec

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


TILING_MODES = ("auto", "on", "off")

Pair = tuple[int, int]


@dataclass(frozen=True)
class TilingChoice:
    """Whether and how a slice is tiled: the "Tiling" setting of the widgets and ``segment()``.

    Args:
        mode: "auto" (tile when :func:`napari_sam.tiling.needs_tiling` says so: the slice's long
            side exceeds 1.5x the model's input size), "on" (always) or "off" (never).
        tile_shape: (th, tw) (or an int) of each embedded crop, halo included; None: the
            model's input size (:func:`napari_sam.tiling.default_tile_shape`).
        halo: (hy, hx) (or an int) of context around each tile's core; None: an eighth of the
            tile shape (:func:`napari_sam.tiling.default_halo`).

    Raises:
        ValueError: an unknown mode or a malformed size.
    """

    mode: str = "auto"
    tile_shape: Optional[Pair] = None
    halo: Optional[Pair] = None

    def __post_init__(self) -> None:
        if self.mode not in TILING_MODES:
            raise ValueError(f"tiling must be one of {TILING_MODES}, got {self.mode!r}.")
        object.__setattr__(self, "tile_shape", as_pair(self.tile_shape, "tile_shape"))
        object.__setattr__(self, "halo", as_pair(self.halo, "halo"))

    def resolve(self, plane_shape: Sequence[int], input_size: int, with_store: bool = False) -> Optional[tuple[Pair, Pair]]:
        """The (tile_shape, halo) to use on a slice of (H, W) ``plane_shape``, or None for the untiled path.

        Args:
            plane_shape: (H, W) of the slice.
            input_size: the model's input long side (``sam.image_encoder.img_size``).
            with_store: an embedding store is in use. Untiled work with a store uses one tile
                that is the whole slice (tile shape = the slice's shape, no halo: exactly the
                untiled embedding), so that the store holds it.

        Returns:
            ((th, tw), (hy, hx)), or None when the slice is embedded whole without a store
            (the plain path, unchanged).
        """
        from ..tiling import default_halo, default_tile_shape, needs_tiling

        plane = (int(plane_shape[0]), int(plane_shape[1]))
        tiled = self.mode == "on" or (self.mode == "auto" and needs_tiling(plane, input_size))
        if not tiled:
            return (plane, (0, 0)) if with_store else None
        tile = self.tile_shape or default_tile_shape(input_size)
        return tile, (self.halo if self.halo is not None else default_halo(tile))


class TileProgress(NamedTuple):
    """Progress of a tile's embedding: encoder step ``done`` of ``total`` on tile ``tile``
    (1-based) of ``tiles`` in the slice's grid."""

    done: int
    total: int
    tile: int
    tiles: int


class SlicePlane:
    """One 2-D slice of nD layer data as a lazy HxW(xC) array: only the pixels asked for are read.

    What :class:`napari_sam.tiling.TileEmbeddings` needs of an image (``shape``, ``dtype``,
    indexing by two slices), so that embedding one tile of a slide scan (or of a zarr / dask
    layer) reads that tile's crop, not the whole slice.

    Args:
        data: the layer data, shape ``spec.shape`` (plus a trailing channel axis when ``rgb``).
        spec: the slice.
        rgb: the data has a trailing RGB(A) channel axis.
    """

    def __init__(self, data: Any, spec: SliceSpec, rgb: bool) -> None:
        self.data, self.spec, self.rgb = data, spec, bool(rgb)
        self.shape = tuple(spec.plane_shape) + ((int(data.shape[-1]),) if self.rgb else ())
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            return np.asarray(self)[key]
        rows, cols = key
        index = [rows if axis == self.spec.row_axis else cols if axis == self.spec.col_axis else value
                 for axis, value in enumerate(self.spec.index)]
        plane = np.asarray(self.data[tuple(index)])
        if self.spec.row_axis > self.spec.col_axis:  # transposed display, as SliceSpec.take
            plane = np.swapaxes(plane, 0, 1)
        return plane

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        plane = self.spec.take(self.data, rgb=self.rgb)
        return plane if dtype is None else plane.astype(dtype)


def store_plane_index(spec: SliceSpec) -> int:
    """The plane of an embedding store that holds ``spec``'s slice.

    A store holds the planes of the image's last two spatial axes, numbered in C order over
    the other axes (0 for a 2-D image; ``t * Z + z`` for (T, Z, Y, X)).

    Raises:
        ValueError: the displayed axes are not the last two (e.g. an orthogonal view of a stack).
    """
    if sorted(spec.displayed) != [spec.ndim - 2, spec.ndim - 1]:
        raise ValueError(
            "An embedding store holds slices of the image's last two axes; the viewer shows axes "
            f"{spec.displayed} of a {spec.ndim}-D image. Show the last two axes, or clear the embeddings store field."
        )
    others = spec.shape[:-2]
    return int(np.ravel_multi_index(spec.index[:-2], others)) if others else 0


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
        self._stores: dict[Hashable, Any] = {}  # (path, model, tile shape, halo, on_mismatch) -> EmbeddingStore
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
                self._stores.clear()

    def set_model(self, model: Any) -> None:
        """Use an already built ``Sam`` module."""
        with self.lock:
            self.model = model
            self.spec = None
            self._predictor = None
            self._model_serial += 1
            self._choice_serial += 1
            self.cache.clear()
            self._stores.clear()

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
    def input_size(self) -> int:
        """The model's input long side (1024 for the official models, 256 for ``vit_small``); loads it."""
        return int(self.ensure_model().image_encoder.img_size)

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

    # -- tiles and stores ---------------------------------------------------------------------
    def embedding_store(self, path: "os.PathLike[str] | str", tile_shape: Pair, halo: Pair,
                        on_mismatch: str = "error") -> Any:
        """The :class:`napari_sam.EmbeddingStore` at ``path`` for this model and tiling, opened once.

        One store object is kept per (absolute path, model, tile shape, halo, ``on_mismatch``),
        so a session writes and reads through the same object; another model or tiling opens
        the path again (and the store says whether it fits). Changing the model forgets them.

        Raises:
            napari_sam.StoreMismatchError: the store holds another model's or tiling's embeddings
                (with ``on_mismatch="error"``); what the store raises for an unusable path.
        """
        from ..embedding_store import EmbeddingStore

        model = self.ensure_model()
        tile, margin = as_pair(tile_shape, "tile_shape"), as_pair(halo, "halo")
        key = (os.path.abspath(os.fspath(path)), self.model_key, tile, margin, on_mismatch)
        with self.lock:
            store = self._stores.get(key)
            if store is None:
                # The registry's name (e.g. "vit_b_lm"); a checkpoint of detected type ("auto") is named by the store.
                model_type = self.spec.model_type if self.spec is not None and self.spec.model_type != "auto" else None
                store = EmbeddingStore(os.fspath(path), model, model_type=model_type, tile_shape=tile, halo=margin,
                                       on_mismatch=on_mismatch, precision=self.precision,
                                       write_behind=True)  # a click does not wait for the disk
                self._stores[key] = store
            return store

    def tiled_predictor(self, tile_shape: Pair, halo: Pair, store: Any = None) -> Any:
        """A new :class:`napari_sam.TiledPredictor` of the current model that keeps its tile
        embeddings in this engine's cache (one per job, so jobs never share an image)."""
        from ..tiled_predictor import TiledPredictor

        model = self.ensure_model()
        with self.lock:
            return TiledPredictor(model, tile_shape=tile_shape, halo=halo, store=store, precision=self.precision,
                                  cache=self.cache)

    def tiled_prediction_steps(
        self,
        plane: Any,
        objects: Sequence[ObjectPrompt],
        tile_shape: Pair,
        halo: Pair,
        *,
        contrast_limits: Optional[Sequence[float]] = None,
        store: Any = None,
        plane_index: int = 0,
        cache_key: Optional[Hashable] = None,
    ) -> Generator[TileProgress, None, list[np.ndarray]]:
        """One full-slice mask per object, each predicted from the one tile that answers its prompt.

        Only the tiles that the objects' prompts choose (:func:`napari_sam.tiling.anchor_point`)
        are embedded, each at most once: from the cache, else the store, else the encoder (then
        written to both). With no objects nothing is embedded, but the store is checked against
        the slice (a mismatch is reported before the first click).

        Args:
            plane: the slice, HxW or HxWxC, any real dtype (e.g. a :class:`SlicePlane`: only the
                crops of the embedded tiles are read).
            objects: the objects' prompts in the slice's (x, y) frame.
            tile_shape, halo: the tiling (from :meth:`TilingChoice.resolve`).
            contrast_limits: the layer's (low, high) display mapping (ignored for uint8 data).
            store: an embedding store (:meth:`embedding_store`) or None.
            plane_index: the store's plane of this slice (:func:`store_plane_index`).
            cache_key: the slice's cache key (:meth:`cache_key`); the tiling and the tile
                index are appended to it. None: embeddings are kept by this call only.

        Yields:
            :class:`TileProgress` after every encoder step (nothing for cached or stored tiles).

        Returns:
            One HxW bool mask per object, in the slice's frame (the best of 3 for a single point).

        Raises:
            napari_sam.StoreMismatchError: the store does not fit this image, model or tiling.
            ValueError: an object without points or box.
        """
        predictor = self.tiled_predictor(tile_shape, halo, store)
        key = None if cache_key is None else (cache_key, ("tiles", tuple(tile_shape), tuple(halo)))
        with self.lock:
            self.adopt_thread_settings()
            predictor.set_image(plane, contrast_limits=contrast_limits, plane_index=plane_index, cache_key=key)
        grid, embeddings = predictor.grid, predictor.embeddings
        height, width = int(plane.shape[0]), int(plane.shape[1])
        masks = []
        for obj in objects:
            kwargs = obj.predict_kwargs()
            tile = predictor.tile_for(kwargs.get("point_coords"), kwargs.get("point_labels"), kwargs.get("box"))
            before = len(embeddings.computed)
            yield from self.locked(relabel(
                predictor.embedding_steps(tile), lambda step, n=tile.index + 1: TileProgress(*step, n, len(grid))))
            self.embeddings_computed += len(embeddings.computed) - before
            with self.lock:
                self.adopt_thread_settings()
                out, scores, _, offset = predictor.predict(**kwargs, return_crop=True)
            crop = np.asarray(out[int(np.argmax(scores))], dtype=bool)
            mask = np.zeros((height, width), dtype=bool)
            y0, x0 = (int(v) for v in offset)
            mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
            masks.append(mask)
        return masks

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
