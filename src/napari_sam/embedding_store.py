"""A zarr store of image embeddings, reused across sessions and filled by ``napari-sam-embed``.

An image embedding depends on the model (its type and weights), on the pixels the encoder saw
(a tile's crop, after the display mapping that turns it into SAM's RGB uint8 input) and on the
tiling (which crop each tile is). The store records all of it, so that a stored embedding is
used only where it is valid; everything else is refused with an error that says what differs
(:class:`StoreMismatchError`), or recomputed when the caller asks for that.

Layout (zarr format 3, one folder ``STORE.zarr``)::

    STORE.zarr/                       root group; its attributes (all JSON):
        format                        "napari-sam-embeddings" and format_version (FORMAT_VERSION)
        napari_sam_version            the package version that created the store (recorded, not compared)
        model_type, weights_hash      e.g. "vit_b" and the xxh3_128 hex of the model's state dict (the
                                      hash is compared; the type is named in messages)
        precision                     the encoder's precision ("fp32", "bf16", "fp16")
        embedding_shape, input_size   [C, G, G] of one embedding (e.g. [256, 64, 64]); the model's
                                      input long side (1024 for vit_b, 256 for vit_small)
        tile_shape, halo              [th, tw] and [hy, hx] (napari_sam.tiling.TileGrid)
        plane_shape, dtype, grid_shape  [H, W], "uint16", [rows, columns]: bound by check_image on
                                      first use (null until then)
      display-<16 hex>/               one group per display mapping; the name is the xxh64 of the
                                      mapping's JSON, the group's attribute "mapping" holds it:
                                      {"contrast_limits": [low, high]} or {"identity": true} (uint8
                                      used as it is). Changing contrast limits uses another group.
        features                      float32 (planes, tiles, C, G, G), chunks (1, 1, C, G, G):
                                      one chunk (one file) per embedding, uncompressed
        content                       uint64 (planes, tiles, 2), chunks (1, 1, 2): the xxh3_128 of
                                      the tile's raw pixels (shape, dtype and bytes, before the
                                      mapping) as (high, low) words; (0, 0) = not stored

The validity rule: a stored embedding of (plane, tile) is used when the root attributes match the
model and the tiling, the image has the bound plane shape and dtype, the mapping names the group,
and the content hash of the tile's current pixels equals the stored one. The plane axis grows on
demand (``resize``), or is set up front with ``n_planes``.

Interrupted writes: :meth:`EmbeddingStore.save` writes the features chunk first and the content
hash last, and clears an old hash before overwriting features; a tile counts as stored only once
its hash is written, so a process killed mid-write leaves the tile absent, never a wrong tile
that reads as valid. zarr's ``LocalStore`` (zarr 3) also writes every chunk file to a temporary
``<chunk>.<hex>.partial`` sibling and renames it into place, so a chunk file is whole or absent;
a kill can leave such a ``.partial`` file behind, which zarr ignores (it is not a chunk name).

zarr is an optional dependency (``pip install 'napari-sam[store]'``) imported on first use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .tiling import Tile, TileGrid, TileStoreProtocol, as_pair, default_halo, default_tile_shape

_logger = logging.getLogger(__name__)

#: The value of the root attribute ``format``, and the layout version this module writes and reads.
FORMAT_NAME = "napari-sam-embeddings"
FORMAT_VERSION = 1

#: Fields compared between a store and the current model, tiling and image (in message order).
#: The model type is recorded and named in messages but not compared: the weights hash decides (the same
#: weights chosen as "vit_b_lm" in the widget and as a checkpoint file of detected type "vit_b" fit).
CHECKED_FIELDS = (
    "weights_hash", "embedding_shape", "input_size", "precision", "tile_shape", "halo", "plane_shape", "dtype",
)
_IMAGE_FIELDS = ("plane_shape", "dtype", "grid_shape")
_MODES = ("r", "a", "w")
_ON_MISMATCH = ("error", "recompute")

PathLike = Union[str, os.PathLike]


class StoreMismatchError(ValueError):
    """A store computed with another model, tiling or image than the current one.

    Attributes:
        differences: {field: (stored, current)} for every field that differs (fields of
            :data:`CHECKED_FIELDS`, or ``"content"`` for a tile computed from other pixels).
    """

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.differences = dict(differences)


def _zarr():
    """The zarr module (version 3 or later), imported on first use."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError(
            "The embedding store needs zarr (version 3 or later): pip install 'napari-sam[store]'"
        ) from error
    major = int(str(zarr.__version__).split(".")[0])
    if major < 3:
        raise ImportError(
            f"The embedding store needs zarr 3 or later, found zarr {zarr.__version__}: pip install 'napari-sam[store]'"
        )
    return zarr


# -- hashes -------------------------------------------------------------------------------------------

_WEIGHTS_HASHES: "weakref.WeakKeyDictionary[Any, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_WEIGHTS_LOCK = threading.Lock()


def _tensor_bytes(tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device), C order."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def weights_hash(sam_model) -> str:
    """A fingerprint of a model's weights: xxh3_128 hex over every state-dict tensor's name, shape,
    dtype and bytes, in state-dict order.

    Computed once per model object and cached; the cache entry is reused while every tensor has
    the same storage and version counter (``load_state_dict`` and in-place updates bump it,
    ``.to(device)`` gives new storage), so a changed model is hashed again.

    Args:
        sam_model: a :class:`torch.nn.Module` (normally a ``Sam``).

    Returns:
        32 hex digits.
    """
    import xxhash

    state = sam_model.state_dict()
    stamp = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    with _WEIGHTS_LOCK:
        cached = _WEIGHTS_HASHES.get(sam_model)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    digest = xxhash.xxh3_128()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(_tensor_bytes(tensor))
    value = digest.hexdigest()
    with _WEIGHTS_LOCK:
        _WEIGHTS_HASHES[sam_model] = (stamp, value)
    return value


def content_hash(pixels: np.ndarray) -> tuple[int, int]:
    """The (high, low) 64-bit words of the xxh3_128 of an array's shape, dtype and bytes.

    Never (0, 0), which the store reserves for "not stored".
    """
    import xxhash

    array = np.ascontiguousarray(pixels)
    digest = xxhash.xxh3_128()
    digest.update(repr((tuple(array.shape), array.dtype.str)).encode())
    digest.update(memoryview(array).cast("B") if array.size else b"")
    value = digest.intdigest()
    high, low = value >> 64, value & 0xFFFFFFFFFFFFFFFF
    return (high, low) if (high or low) else (0, 1)


def mapping_of(limits: Optional[Sequence[float]]) -> dict[str, Any]:
    """The JSON form of a display mapping: ``{"contrast_limits": [low, high]}`` or ``{"identity": True}``."""
    if limits is None:
        return {"identity": True}
    low, high = (float(v) for v in limits)
    return {"contrast_limits": [low, high]}


def group_name(limits: Optional[Sequence[float]]) -> str:
    """The group of a display mapping: ``"display-"`` + xxh64 hex of its canonical JSON."""
    import xxhash

    text = json.dumps(mapping_of(limits), sort_keys=True)
    return "display-" + xxhash.xxh64(text.encode()).hexdigest()


def _short(value: Any) -> Any:
    return value[:8] if isinstance(value, str) and len(value) == 32 else value


def _describe(differences: dict[str, tuple[Any, Any]], types: tuple[Any, Any] = (None, None)) -> str:
    """The human list of differences, e.g. "the store was computed with model vit_b (weights 3f2a...),
    this is vit_small (weights 9c1d...); tile shape (1024, 1024) vs (256, 256)".

    Args:
        differences: {field: (stored, current)}.
        types: the (stored, current) model types, named when only the weights differ.
    """
    parts = []
    diff = dict(differences)
    if "model_type" in diff or "weights_hash" in diff:
        stored_type, current_type = diff.pop("model_type", types)
        stored_hash, current_hash = diff.pop("weights_hash", (None, None))
        stored_w = f" (weights {_short(stored_hash)}...)" if stored_hash is not None else ""
        current_w = f" (weights {_short(current_hash)}...)" if current_hash is not None else ""
        parts.append(f"the store was computed with model {stored_type}{stored_w}, this is {current_type}{current_w}")
    for name, (stored, current) in diff.items():
        label = name.replace("_", " ")
        parts.append(f"{label} {_as_text(stored)} vs {_as_text(current)}")
    return "; ".join(parts)


def _as_text(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class _Group:
    """The arrays of one display mapping (features, content) in memory form."""

    def __init__(self, group) -> None:
        self.group = group
        self.features = group["features"]
        self.content = group["content"]


class EmbeddingStore(TileStoreProtocol):
    """Image embeddings of tiles of planes of one image (a 2-D image or a stack), in a zarr folder.

    Implements :class:`napari_sam.tiling.TileStoreProtocol`: :class:`~napari_sam.tiling.TileEmbeddings`
    (hence ``TiledPredictor``, ``TiledAutomaticMaskGenerator``, the widgets and ``napari-sam-embed``)
    reads a tile's embedding from it before running the encoder, and writes what it computes.

    Args:
        path: the store folder (``*.zarr`` by convention).
        sam_model: the model whose embeddings are stored (its type, weights hash, embedding
            shape and input size are checked against the store's); None only with ``mode="r"``
            (inspection: nothing is checked, embeddings load as stored).
        model_type: the model's type name for the attributes and messages; default: detected
            from the model's state dict (``napari_sam.models.detect_model_type``).
        tile_shape: (th, tw) or an int, halo included; default: the store's, else the model's
            input size (:func:`~napari_sam.tiling.default_tile_shape`).
        halo: (hy, hx) or an int; default: the store's, else :func:`~napari_sam.tiling.default_halo`.
        mode: "a" (open or create), "w" (start empty: an existing store is deleted; a folder that
            is not an embedding store is refused) or "r" (read-only: :meth:`save` raises).
        on_mismatch: "error" (raise :class:`StoreMismatchError`) or "recompute" (clear what does
            not fit, log a warning and go on: a store of another model or tiling is emptied, a
            tile computed from other pixels is recomputed).
        n_planes: planes to allocate up front (e.g. a stack's depth); default: grow on demand.
        precision: the precision the image encoder runs in ("fp32", "bf16", "fp16": the
            predictor's); embeddings of another precision differ, so it is checked.
        write_behind: :meth:`save` hands the write to one background thread and returns at
            once, so that a prediction does not wait for the disk (a network share, a slow
            drive); the napari plugin opens its stores so. Reads (:meth:`load`,
            :meth:`contains`, :meth:`completed`, :meth:`info`) first wait for the writes in
            flight, :meth:`flush` waits for them and raises an error any of them met, and the
            writes still queued finish when Python exits. A process killed before a write
            ends leaves that tile absent (its hash is written last), never a wrong tile.

    Raises:
        ImportError: zarr is not installed.
        FileNotFoundError: ``mode="r"`` and no store at ``path``.
        ValueError: a bad mode or option, or ``path`` holds something that is not an embedding store.
        StoreMismatchError: the store was computed with another model or tiling (``on_mismatch="error"``).
    """

    def __init__(
        self,
        path: PathLike,
        sam_model=None,
        *,
        model_type: Optional[str] = None,
        tile_shape: Optional[Union[int, Sequence[int]]] = None,
        halo: Optional[Union[int, Sequence[int]]] = None,
        mode: str = "a",
        on_mismatch: str = "error",
        n_planes: Optional[int] = None,
        precision: str = "fp32",
        write_behind: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if on_mismatch not in _ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {_ON_MISMATCH}, got {on_mismatch!r}.")
        if sam_model is None and mode != "r":
            raise ValueError("An EmbeddingStore opened for writing needs the model (sam_model); only mode 'r' may omit it.")
        zarr = _zarr()
        self.path = Path(path)
        self.mode = mode
        self.on_mismatch = on_mismatch
        self.read_only = mode == "r"
        self._lock = threading.Lock()
        self._groups: dict[str, _Group] = {}
        self.write_behind = bool(write_behind)
        self._writer = None  # the background writer (concurrent.futures executor), made on first save
        self._writes: list = []  # futures of the writes in flight
        self._n_planes = None if n_planes is None else int(n_planes)
        exists = (self.path / "zarr.json").is_file()
        if self.path.exists() and not exists and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ValueError(
                f"{str(self.path)!r} exists and is not a zarr store; choose a new path for the embedding store."
            )
        if mode == "r" and not exists:
            raise FileNotFoundError(f"No embedding store at {str(self.path)!r}.")
        if exists:
            root = zarr.open_group(self.path, mode="r")
            if root.attrs.get("format") != FORMAT_NAME:
                raise ValueError(
                    f"{str(self.path)!r} is a zarr store but not a napari-sam embedding store "
                    f"(its 'format' attribute is {root.attrs.get('format')!r})."
                )
            if mode == "w":
                shutil.rmtree(self.path)
                exists = False
        if exists:
            self.root = zarr.open_group(self.path, mode="r" if self.read_only else "r+")
            self.attrs = dict(self.root.attrs)
            if self.attrs.get("format_version") != FORMAT_VERSION:
                raise StoreMismatchError(
                    f"The embedding store {str(self.path)!r} has layout version {self.attrs.get('format_version')}, "
                    f"this napari-sam reads version {FORMAT_VERSION}; recompute it (napari-sam-embed --overwrite).",
                    {"format_version": (self.attrs.get("format_version"), FORMAT_VERSION)},
                )
        else:
            self.root = None
            self.attrs = {}
        if sam_model is None:
            self.model_type = self.attrs.get("model_type")
            self.precision = self.attrs.get("precision")
            self.input_size = self.attrs.get("input_size")
            self.tile_shape = _tuple(self.attrs.get("tile_shape"))
            self.halo = _tuple(self.attrs.get("halo"))
            self._current: dict[str, Any] = {}
            return
        self.model = sam_model
        self.precision = str(precision)
        self.input_size = int(sam_model.image_encoder.img_size)
        stored_tile = _tuple(self.attrs.get("tile_shape"))
        stored_halo = _tuple(self.attrs.get("halo"))
        if tile_shape is None:
            tile_shape = stored_tile if stored_tile is not None else default_tile_shape(self.input_size)
        self.tile_shape = as_pair(tile_shape, "tile_shape")
        if halo is None:
            same_tiles = stored_halo is not None and self.tile_shape == stored_tile
            halo = stored_halo if same_tiles else default_halo(self.tile_shape)
        self.halo = as_pair(halo, "halo")
        TileGrid(self.tile_shape, self.tile_shape, self.halo)  # validates sizes and halo
        self.model_type = model_type or self._detect_type(sam_model)
        self._current = {
            "model_type": self.model_type,
            "weights_hash": weights_hash(sam_model),
            "embedding_shape": self._embedding_shape(sam_model),
            "input_size": self.input_size,
            "precision": self.precision,
            "tile_shape": self.tile_shape,
            "halo": self.halo,
        }
        if not exists:
            self._create()
            return
        differences = self._differences(self._current)
        if differences:
            self._mismatch(differences, "")
        self._open_groups()

    def _open_groups(self) -> None:
        """Open the display mappings already stored now, so that a first read costs no metadata reads."""
        if self.root is None:
            return
        for name, group in self.root.groups():
            if name not in self._groups and "features" in group and "content" in group:
                self._groups[name] = _Group(group)

    # -- set-up ---------------------------------------------------------------------------------------

    @staticmethod
    def _detect_type(sam_model) -> str:
        try:
            from .models import detect_model_type

            return detect_model_type(sam_model.state_dict())
        except Exception:  # an architecture the registry does not know: the weights hash still identifies it
            return "unknown"

    @staticmethod
    def _embedding_shape(sam_model) -> tuple[int, int, int]:
        channels = int(sam_model.prompt_encoder.embed_dim)
        grid = tuple(int(v) for v in sam_model.prompt_encoder.image_embedding_size)
        return (channels, grid[0], grid[1])

    def _create(self) -> None:
        """Write an empty store bound to the current model and tiling (no image yet)."""
        from . import __version__

        zarr = _zarr()
        self.attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "napari_sam_version": __version__,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self._current.items()},
            "plane_shape": None,
            "dtype": None,
            "grid_shape": None,
        }
        self.root = zarr.open_group(self.path, mode="w", attributes=self.attrs)
        self._groups = {}

    def _clear(self, reason: str) -> None:
        """Drop every embedding and rebind the store to the current model and tiling."""
        if self.read_only:
            raise StoreMismatchError(
                f"The embedding store {str(self.path)!r} does not fit ({reason}) and was opened read-only; "
                "open it with mode 'a' to recompute it.",
                {},
            )
        _logger.warning("Embedding store %s: %s; its embeddings are deleted and recomputed.", self.path, reason)
        shutil.rmtree(self.path)
        self._create()

    def _differences(self, current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        differences = {}
        for name in CHECKED_FIELDS:
            if name not in current:
                continue
            stored = _tuple(self.attrs.get(name))
            value = current[name]
            if stored is None and name in _IMAGE_FIELDS:
                continue  # not bound yet
            if stored != value:
                differences[name] = (stored, value)
        return differences

    def _mismatch(self, differences: dict[str, tuple[Any, Any]], context: str) -> None:
        text = _describe(differences, (self.attrs.get("model_type"), self._current.get("model_type")))
        if self.on_mismatch == "recompute":
            self._clear(text)
            return
        raise StoreMismatchError(
            f"The embedding store {str(self.path)!r} does not fit{context}: {text}. Use another store, or recompute "
            "it (on_mismatch='recompute'; napari-sam-embed --recompute-mismatched or --overwrite).",
            differences,
        )

    # -- TileStoreProtocol ---------------------------------------------------------------------------

    def check_image(self, grid: TileGrid, dtype: np.dtype) -> None:
        """Bind the store to an image's plane shape, dtype and tile grid on first use; afterwards
        check that ``grid`` and ``dtype`` are the bound ones.

        Args:
            grid: the tiles of one plane (its ``image_shape`` is (H, W)).
            dtype: the image's dtype (before the display mapping).

        Raises:
            StoreMismatchError: another model, tile shape, halo, plane shape or dtype (every
                difference is named), unless ``on_mismatch="recompute"`` (then the store is emptied).
        """
        current = dict(self._current)
        current.update({
            "tile_shape": tuple(grid.tile_shape),
            "halo": tuple(grid.halo),
            "plane_shape": tuple(int(v) for v in grid.image_shape),
            "dtype": np.dtype(dtype).name,
        })
        with self._lock:
            differences = self._differences(current)
            if differences:
                self._mismatch(differences, " this image")
            if self.attrs.get("plane_shape") is None:
                if self.read_only:
                    raise StoreMismatchError(
                        f"The embedding store {str(self.path)!r} holds no image yet and was opened read-only.", {}
                    )
                self.attrs.update({
                    "tile_shape": list(grid.tile_shape),
                    "halo": list(grid.halo),
                    "plane_shape": list(current["plane_shape"]),
                    "dtype": current["dtype"],
                    "grid_shape": list(grid.grid_shape),
                })
                self.root.update_attributes(self.attrs)  # one write of zarr.json (attrs.update writes per key)
                self._current.update({"tile_shape": tuple(grid.tile_shape), "halo": tuple(grid.halo)})

    def _bound(self) -> None:
        if self.attrs.get("plane_shape") is None:
            raise RuntimeError("check_image(grid, dtype) must be called before loading or saving embeddings.")

    @property
    def n_tiles(self) -> Optional[int]:
        """Tiles per plane once an image is bound, else None."""
        shape = self.attrs.get("grid_shape")
        return None if shape is None else int(shape[0]) * int(shape[1])

    def _group(self, limits: Optional[Sequence[float]], create: bool) -> Optional[_Group]:
        name = group_name(limits)
        found = self._groups.get(name)
        if found is not None:
            return found
        if name in self.root:
            found = _Group(self.root[name])
        elif create:
            channels, gy, gx = (int(v) for v in self.attrs["embedding_shape"])
            planes = self._n_planes or 1
            group = self.root.create_group(name, attributes={"mapping": mapping_of(limits)})
            group.create_array(
                "features", shape=(planes, self.n_tiles, channels, gy, gx), chunks=(1, 1, channels, gy, gx),
                dtype="float32", fill_value=0.0, compressors=None,
            )
            group.create_array(
                "content", shape=(planes, self.n_tiles, 2), chunks=(1, 1, 2), dtype="uint64", fill_value=0,
                compressors=None,
            )
            found = _Group(group)
        else:
            return None
        self._groups[name] = found
        return found

    def _stored_hash(self, group: _Group, plane_index: int, tile: Tile) -> tuple[int, int]:
        if plane_index >= group.content.shape[0]:
            return (0, 0)
        words = group.content[plane_index, tile.index]
        return int(words[0]), int(words[1])

    def _check_tile(self, plane_index: int, tile: Tile) -> None:
        self._bound()
        if plane_index < 0:
            raise ValueError(f"plane_index must be zero or positive, got {plane_index}.")
        if not 0 <= tile.index < self.n_tiles:
            raise ValueError(f"Tile {tile.index} is not one of the store's {self.n_tiles} tiles per plane.")

    def contains(self, plane_index: int, tile: Tile, limits: Optional[Sequence[float]], pixels: np.ndarray) -> bool:
        """Whether a valid embedding of the tile is stored (its content hash read, not its features).

        Raises:
            StoreMismatchError: the tile was stored from other pixels (``on_mismatch="error"``).
        """
        self.flush()
        with self._lock:
            return self._contains(plane_index, tile, limits, pixels)

    def _contains(self, plane_index: int, tile: Tile, limits: Optional[Sequence[float]], pixels: np.ndarray) -> bool:
        self._check_tile(plane_index, tile)
        group = self._group(limits, create=False)
        if group is None:
            return False
        stored = self._stored_hash(group, plane_index, tile)
        if stored == (0, 0):
            return False
        if stored != content_hash(pixels):
            if self.on_mismatch == "recompute":
                return False
            raise StoreMismatchError(
                f"Tile {tile.index} of plane {plane_index} in the embedding store {str(self.path)!r} was computed "
                "from other pixels: the image changed. Use another store, or recompute it (on_mismatch='recompute').",
                {"content": (f"{stored[0]:016x}{stored[1]:016x}", "{:016x}{:016x}".format(*content_hash(pixels)))},
            )
        return True

    def load(self, plane_index: int, tile: Tile, limits: Optional[Sequence[float]], pixels: np.ndarray):
        """The stored embedding of a tile, or None when it is not stored.

        Args:
            plane_index: the plane (0 for a 2-D image, the slice of a stack).
            tile: a tile of the bound grid.
            limits: the display mapping ((low, high) or None for uint8 as it is).
            pixels: the tile's crop of the image as given (before the mapping).

        Returns:
            An :class:`~napari_sam.predictor.ImageEmbedding` (features 1xCxGxG float32 on the CPU,
            original_size = the crop's (h, w), input_size = its size resized to the model's input
            long side), or None.

        Raises:
            StoreMismatchError: the tile was stored from other pixels (``on_mismatch="error"``;
                with "recompute" the answer is None and :meth:`save` overwrites it).
        """
        import torch

        from .predictor import ImageEmbedding
        from .utils.transforms import ResizeLongestSide

        self.flush()
        with self._lock:
            if not self._contains(plane_index, tile, limits, pixels):
                return None
            features = self._groups[group_name(limits)].features[plane_index, tile.index]
        height, width = tile.crop_shape
        size = int(self.input_size)
        return ImageEmbedding(
            features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None],
            original_size=(height, width),
            input_size=ResizeLongestSide.get_preprocess_shape(height, width, size),
        )

    def save(self, plane_index: int, tile: Tile, limits: Optional[Sequence[float]], pixels: np.ndarray, embedding) -> None:
        """Store a tile's embedding: the features chunk first, its content hash last (the hash marks
        the tile complete; an old hash is cleared before its features are overwritten).

        Args:
            plane_index, tile, limits, pixels: as :meth:`load`.
            embedding: the :class:`~napari_sam.predictor.ImageEmbedding` of the tile's crop
                (features 1xCxGxG, any device; stored as float32).

        Raises:
            PermissionError: the store was opened read-only.
            ValueError: features of another shape than the store's embedding shape.
        """
        if self.read_only:
            raise PermissionError(
                f"The embedding store {str(self.path)!r} was opened read-only (mode 'r'); open it with mode 'a' to "
                "add embeddings."
            )
        expected = tuple(int(v) for v in self.attrs["embedding_shape"])
        features = embedding.features.detach().to("cpu", dtype=_float32())
        if tuple(features.shape) != (1, *expected):
            raise ValueError(f"Expected features of shape 1x{'x'.join(map(str, expected))}, got {tuple(features.shape)}.")
        digest = content_hash(pixels)
        self._check_tile(plane_index, tile)
        array = features[0].numpy()
        if not self.write_behind:
            self._write(plane_index, tile, limits, digest, array)
            return
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam-embedding-store")
        self._writes = [write for write in self._writes if not write.done() or write.exception() is not None]
        self._writes.append(self._writer.submit(self._write, plane_index, tile, limits, digest, array))

    def _write(self, plane_index: int, tile: Tile, limits: Optional[Sequence[float]], digest: tuple[int, int],
               features: np.ndarray) -> None:
        """Write one tile: clear an old hash, write the features chunk, then the hash (the complete mark)."""
        with self._lock:
            group = self._group(limits, create=True)
            if plane_index >= group.content.shape[0]:
                planes = max(plane_index + 1, self._n_planes or 0)
                group.features.resize((planes, *group.features.shape[1:]))
                group.content.resize((planes, *group.content.shape[1:]))
            if self._stored_hash(group, plane_index, tile) != (0, 0):
                group.content[plane_index, tile.index] = np.zeros(2, dtype=np.uint64)
            group.features[plane_index, tile.index] = features
            group.content[plane_index, tile.index] = np.asarray(digest, dtype=np.uint64)

    def flush(self) -> None:
        """Wait for the writes in flight (``write_behind``); raise the first error one of them met.

        Raises:
            Exception: what a background write raised (e.g. ``OSError`` for a full disk); the
                tile it was writing is absent from the store.
        """
        writes, self._writes = self._writes, []
        errors = [error for error in (write.exception() for write in writes) if error is not None]
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Finish the writes in flight (:meth:`flush`) and stop the background writer."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- inspection ----------------------------------------------------------------------------------

    def completed(self, limits: Optional[Sequence[float]]) -> np.ndarray:
        """Which tiles are stored for a display mapping: bool (planes, tiles) (planes allocated so
        far; (0, tiles) when nothing is stored for the mapping). Content hashes are not checked."""
        self.flush()
        n_tiles = self.n_tiles or 0
        if self.root is None or self.attrs.get("plane_shape") is None:
            return np.zeros((0, n_tiles), dtype=bool)
        with self._lock:
            group = self._group(limits, create=False)
            if group is None:
                return np.zeros((0, n_tiles), dtype=bool)
            content = group.content[...]
        return np.asarray(content != 0).any(axis=-1)

    def mappings(self) -> list[dict[str, Any]]:
        """The display mappings stored (the ``mapping`` attribute of each group)."""
        return [dict(group.attrs.get("mapping", {})) for _, group in sorted(self.root.groups())]

    def info(self) -> dict[str, Any]:
        """What the store holds: its attributes and, per display mapping, the tiles stored."""
        self.flush()
        summary = {"path": str(self.path), "mode": self.mode}
        summary.update({k: v for k, v in self.attrs.items() if k != "format"})
        groups = []
        for name, group in sorted(self.root.groups()):
            content = group["content"][...]
            groups.append({
                "group": name,
                "mapping": dict(group.attrs.get("mapping", {})),
                "planes": int(content.shape[0]),
                "tiles_stored": int(np.asarray(content != 0).any(axis=-1).sum()),
            })
        summary["mappings"] = groups
        return summary

    def __repr__(self) -> str:
        info = self.info()
        stored = sum(g["tiles_stored"] for g in info["mappings"])
        return (
            f"EmbeddingStore({str(self.path)!r}, mode={self.mode!r}, model={info.get('model_type')} "
            f"(weights {str(info.get('weights_hash'))[:8]}...), tile_shape={_as_text(info.get('tile_shape'))}, "
            f"halo={_as_text(info.get('halo'))}, plane_shape={_as_text(info.get('plane_shape'))}, "
            f"dtype={info.get('dtype')}, {len(info['mappings'])} display mapping(s), {stored} tile embedding(s))"
        )


def _float32():
    import torch

    return torch.float32


__all__ = [
    "CHECKED_FIELDS", "EmbeddingStore", "FORMAT_NAME", "FORMAT_VERSION", "StoreMismatchError", "content_hash",
    "group_name", "mapping_of", "weights_hash",
]
