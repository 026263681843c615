"""Tiles of a large image: which pixels each tile embeds, which pixels it answers for.

SAM resizes every image to its input size on the long side (1024 px for the official models,
256 for ``vit_small``); on a 10000 px slide scan that shrinks a 20 px nucleus to 2 px. Tiling
embeds the image in pieces at native resolution instead. :class:`TileGrid` is the one place
that decides the pieces; :class:`napari_sam.TiledPredictor`, the tiled automatic mask
generator, the embedding store and the plugin all use it.

Terms (all in pixels of the full image, (y, x) / (row, column) order unless said otherwise):

* **tile shape** ``(th, tw)``: the size of the crop that is embedded, halo included. With the
  default (the model's input size) every crop is embedded at native resolution.
* **halo** ``(hy, hx)``: the margin of context around a tile's core on each side.
* **core**: the pixels a tile answers for. Cores are the cells of a regular grid of step
  ``tile shape - 2 * halo``; they cover the image without overlap, so every pixel lies in
  exactly one core.
* **crop**: the embedded pixels: the core grown by the halo on each side, then shifted (not
  clipped) to lie inside the image, so that every crop has the full tile shape when the image
  is at least that large (no tile is upsampled or embedded at another scale). A core always
  lies inside its crop with at least the halo of context on each side that is not an image
  border.

An object whose reference point (a prompt's anchor, a mask's box centre) lies in a tile's
core and that reaches at most the halo beyond the core lies wholly inside that tile's crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

#: Tiling switches itself on ("auto") when the image's long side exceeds the model's input
#: size by more than this factor: objects would shrink by more than that in an untiled embedding.
AUTO_TILING_FACTOR = 1.5

#: The default halo as a fraction of the tile shape (an eighth: 128 px for 1024 px tiles).
DEFAULT_HALO_FRACTION = 1 / 8

ShapeLike = Union[int, Sequence[int]]


def as_pair(value: Optional[ShapeLike], name: str = "size") -> Optional[tuple[int, int]]:
    """A tile shape or halo as a (y, x) pair of ints: an int means both; None stays None (a default).

    Raises:
        ValueError: not an int, None or two values (the message names ``name``).
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    items = tuple(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a (y, x) pair, got {value!r}.")
    return (int(items[0]), int(items[1]))


def default_tile_shape(input_size: int) -> tuple[int, int]:
    """The default tile shape for a model whose input long side is ``input_size`` (its own size)."""
    return (int(input_size), int(input_size))


def default_halo(tile_shape: ShapeLike) -> tuple[int, int]:
    """The default halo of ``tile_shape``: an eighth of it on each axis (128 for 1024)."""
    ty, tx = as_pair(tile_shape, "tile_shape")
    return (int(ty * DEFAULT_HALO_FRACTION), int(tx * DEFAULT_HALO_FRACTION))


def needs_tiling(image_shape: Sequence[int], input_size: int, factor: float = AUTO_TILING_FACTOR) -> bool:
    """Whether "auto" tiling tiles an image of (H, W) ``image_shape`` for a model of input ``input_size``.

    True when the long side exceeds ``factor`` times the input size: an untiled embedding
    would shrink objects by more than ``factor`` (measured on fluorescence nuclei with
    ``vit_small``: mean box IoU 0.63 on the whole 512 px image, 0.77 on native 256 px crops).
    """
    return max(int(image_shape[0]), int(image_shape[1])) > factor * int(input_size)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`.

    Attributes:
        index: position in the grid's row-major order (``grid.tiles[index]``).
        position: (row, column) in the grid.
        core: (y0, x0, y1, x1) half-open box of the pixels this tile answers for.
        crop: (y0, x0, y1, x1) half-open box of the pixels it embeds (core + halo, inside the image).
    """

    index: int
    position: tuple[int, int]
    core: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]

    @property
    def offset(self) -> tuple[int, int]:
        """(y0, x0) of the crop: add it to crop coordinates to get full-image ones."""
        return self.crop[0], self.crop[1]

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(h, w) of the crop."""
        return self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]

    @property
    def crop_slices(self) -> tuple[slice, slice]:
        """Index the image with these to get the crop: ``image[tile.crop_slices]``."""
        return slice(self.crop[0], self.crop[2]), slice(self.crop[1], self.crop[3])

    @property
    def crop_box_xywh(self) -> list[int]:
        """The crop as an XYWH box (the reference's ``crop_box`` convention)."""
        y0, x0, y1, x1 = self.crop
        return [x0, y0, x1 - x0, y1 - y0]

    def core_contains(self, y: float, x: float) -> bool:
        """Whether the point (y, x) (pixel coordinates, full image) lies in the core."""
        y0, x0, y1, x1 = self.core
        return y0 <= y < y1 and x0 <= x < x1


class TileGrid:
    """The tiles of an image of shape (H, W): cores on a regular grid, crops with a halo.

    Args:
        image_shape: (H, W) of the image (further leading values are ignored: pass
            ``array.shape[-2:]`` or the (y, x) shape of a slice).
        tile_shape: (th, tw) (or an int) of each crop, halo included.
        halo: (hy, hx) (or an int) of context around each core; ``2 * halo < tile_shape``.

    An image no larger than the tile shape is one tile whose crop is the whole image (the
    untiled embedding). A crop is smaller than the tile shape only along an axis where the
    image itself is smaller.

    Raises:
        ValueError: non-positive sizes, a negative halo, or a halo that leaves no core
            (``2 * halo >= tile_shape``).
    """

    def __init__(self, image_shape: Sequence[int], tile_shape: ShapeLike, halo: ShapeLike) -> None:
        height, width = int(image_shape[0]), int(image_shape[1])
        tile = as_pair(tile_shape, "tile_shape")
        margin = as_pair(halo, "halo")
        if height < 1 or width < 1:
            raise ValueError(f"The image must have at least one pixel, got shape {(height, width)}.")
        if min(tile) < 1:
            raise ValueError(f"tile_shape must be positive, got {tile}.")
        if min(margin) < 0:
            raise ValueError(f"halo must be zero or positive, got {margin}.")
        if any(2 * m >= t for m, t in zip(margin, tile)):
            raise ValueError(
                f"halo {margin} leaves no core in tiles of {tile}: each tile's core is tile_shape - 2 * halo, "
                "so the halo must be less than half the tile shape."
            )
        self.image_shape = (height, width)
        self.tile_shape = tile
        self.halo = margin
        self.core_step = (tile[0] - 2 * margin[0], tile[1] - 2 * margin[1])
        rows = self._axis(height, tile[0], margin[0], self.core_step[0])
        columns = self._axis(width, tile[1], margin[1], self.core_step[1])
        self.grid_shape = (len(rows), len(columns))
        self._rows, self._columns = rows, columns
        self._tiles: Optional[list[Tile]] = None

    @property
    def tiles(self) -> list[Tile]:
        """Every tile, in row-major order (made on first use: a click needs only its own tile)."""
        if self._tiles is None:
            self._tiles = [self._make(index) for index in range(len(self))]
        return self._tiles

    def _make(self, index: int) -> Tile:
        r, c = divmod(index, self.grid_shape[1])
        (core_y, crop_y), (core_x, crop_x) = self._rows[r], self._columns[c]
        return Tile(
            index=index,
            position=(r, c),
            core=(core_y[0], core_x[0], core_y[1], core_x[1]),
            crop=(crop_y[0], crop_x[0], crop_y[1], crop_x[1]),
        )

    @staticmethod
    def _axis(length: int, tile: int, halo: int, step: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(core, crop) intervals along one axis."""
        if length <= tile:
            return [((0, length), (0, length))]
        count = math.ceil(length / step)
        intervals = []
        for i in range(count):
            core = (i * step, min((i + 1) * step, length))
            start = min(max(core[0] - halo, 0), length - tile)
            intervals.append((core, (start, start + tile)))
        return intervals

    def __len__(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def __getitem__(self, index: int) -> Tile:
        if self._tiles is not None:
            return self._tiles[index]
        if not -len(self) <= index < len(self):
            raise IndexError(f"tile index {index} out of range for {len(self)} tiles")
        return self._make(index % len(self))

    def __repr__(self) -> str:
        return (
            f"TileGrid(image_shape={self.image_shape}, tile_shape={self.tile_shape}, halo={self.halo}, "
            f"{self.grid_shape[0]}x{self.grid_shape[1]} tiles)"
        )

    def tile_at(self, y: float, x: float) -> Tile:
        """The tile whose core holds the point (y, x) (full-image pixel coordinates, row then
        column; points outside the image count for the nearest core).
        """
        r = self._cell(y, 0)
        c = self._cell(x, 1)
        return self[r * self.grid_shape[1] + c]

    def _cell(self, value: float, axis: int) -> int:
        count = self.grid_shape[axis]
        if count == 1:
            return 0
        cell = int(math.floor(float(value) / self.core_step[axis]))
        return min(max(cell, 0), count - 1)

    def tile_for_box(self, box_xyxy: Sequence[float]) -> Tile:
        """The tile that answers a box prompt: the one whose core holds the box's centre.

        Args:
            box_xyxy: (x0, y0, x1, y1) in full-image pixels (the predictor's box convention).
        """
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        return self.tile_at((y0 + y1) / 2, (x0 + x1) / 2)

    def tiles_overlapping(self, box_yxyx: Sequence[float]) -> list[Tile]:
        """The tiles whose cores intersect the half-open box (y0, x0, y1, x1)."""
        y0, x0, y1, x1 = (float(v) for v in box_yxyx)
        return [
            tile
            for tile in self.tiles
            if tile.core[0] < y1 and y0 < tile.core[2] and tile.core[1] < x1 and x0 < tile.core[3]
        ]


def anchor_point(
    point_coords: Optional[np.ndarray], point_labels: Optional[np.ndarray], box: Optional[np.ndarray]
) -> tuple[float, float]:
    """The (y, x) point that decides which tile answers a prompt (full-image pixels).

    The rule: the centre of the box when there is one; else the mean of the positive points;
    else the mean of all points. Inputs follow :meth:`napari_sam.SamPredictor.predict`
    (points Nx2 as (x, y), labels N, box XYXY).

    Raises:
        ValueError: no box and no points.
    """
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=float).reshape(4))
        return (y0 + y1) / 2, (x0 + x1) / 2
    if point_coords is None or len(point_coords) == 0:
        raise ValueError("A tiled prediction needs a prompt point or a box to choose its tile.")
    coords = np.asarray(point_coords, dtype=float).reshape(-1, 2)
    if point_labels is not None:
        positive = np.asarray(point_labels).reshape(-1) == 1
        if positive.any():
            coords = coords[positive]
    x, y = coords.mean(axis=0)
    return float(y), float(x)


#: Robust contrast limits of a large non-uint8 image are taken from a regular subsample of at
#: most this many pixels, so that choosing the display mapping never reads a slide scan twice.
LIMITS_SAMPLE_PIXELS = 2**22


def shared_contrast_limits(image: np.ndarray) -> Optional[tuple[float, float]]:
    """The display mapping every tile of ``image`` shares when the caller gives none.

    uint8 images need none (None: used as they are, as :func:`~napari_sam.utils.image.to_rgb_uint8`
    does). Other dtypes get the robust percentiles of :data:`napari_sam.utils.image.ROBUST_PERCENTILES`
    of the finite values of the whole image, or of a regular (strided) subsample of at most
    :data:`LIMITS_SAMPLE_PIXELS` pixels when it is larger. Per-tile percentiles would map the
    same intensity to different grey values in neighbouring tiles. A constant or all-NaN image
    gives (low, low + 1).
    """
    from .utils.image import ROBUST_PERCENTILES

    array = np.asarray(image) if not hasattr(image, "shape") else image
    if array.dtype == np.uint8 or array.dtype == np.bool_:
        return None
    height, width = int(array.shape[0]), int(array.shape[1])
    stride = max(1, int(math.ceil(math.sqrt(height * width / LIMITS_SAMPLE_PIXELS))))
    sample = np.asarray(array[::stride, ::stride], dtype=np.float32)
    if sample.ndim == 3 and sample.shape[2] == 4:
        sample = sample[..., :3]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(finite, ROBUST_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


class TileStoreProtocol:
    """What :class:`TileEmbeddings` asks of an embedding store (``napari_sam.embedding_store.EmbeddingStore``).

    ``limits`` is the display mapping ((low, high), or None for uint8 data used as it is);
    ``pixels`` is the tile's crop of the image as given (before the mapping), from which the
    store checks that a stored embedding was computed from the same pixels.
    """

    def check_image(self, grid: TileGrid, dtype: np.dtype) -> None:  # pragma: no cover - protocol
        """Raise ``StoreMismatchError`` (a ValueError) when the store holds another image layout or tiling."""
        raise NotImplementedError

    def load(self, plane_index: int, tile: Tile, limits: Optional[tuple[float, float]], pixels: np.ndarray):
        """The stored ``ImageEmbedding`` of the tile, or None when it is not stored (yet)."""
        raise NotImplementedError  # pragma: no cover - protocol

    def save(self, plane_index: int, tile: Tile, limits: Optional[tuple[float, float]], pixels: np.ndarray, embedding) -> None:
        """Store the tile's embedding (atomically: an interrupted write leaves it absent)."""
        raise NotImplementedError  # pragma: no cover - protocol


class NoCache:
    """A cache that keeps nothing (give it to :class:`TileEmbeddings` with any ``cache_key``): each
    tile's embedding is released once used, for work that visits every tile once (the tiled
    automatic mask generator, ``napari-sam-embed``) and must hold one tile at a time."""

    @staticmethod
    def get(key) -> None:
        return None

    @staticmethod
    def put(key, embedding) -> None:
        pass


class TileEmbeddings:
    """The image embeddings of one 2-D image's tiles, computed lazily, on demand.

    A tile's embedding comes from the first of: the memory cache (when given), the embedding
    store (when given), the image encoder (then written to the store and the cache). Nothing
    is computed up front: the first prompt on a 10000 x 10000 image costs one tile.

    Args:
        predictor: the :class:`~napari_sam.SamPredictor` whose model embeds the crops (its
            current image is not touched: crops go through ``embedding_steps``).
        image: HxW, HxWx1, HxWx3 or HxWx4 array of any real dtype (numpy, or any array that
            can be sliced lazily, such as a zarr or dask array: only the crops of embedded
            tiles are read).
        grid: the tiles of the image (``grid.image_shape == image.shape[:2]``).
        image_format: "RGB" or "BGR", the channel order of ``image``.
        contrast_limits: (low, high) display mapping, as napari shows the image: intensities
            mapped linearly to 0-255 (for uint8 data too, unless they are (0, 255): then the
            pixels are used as they are); default :func:`shared_contrast_limits` (one mapping
            for all tiles; none for uint8).
        store: an embedding store (see :class:`TileStoreProtocol`), or None.
        plane_index: which plane of the store's image this is (0 for a 2-D image; the slice
            index of a stack).
        cache: an :class:`~napari_sam.interactive.engine.EmbeddingCache` (or any object with
            ``get(key)`` and ``put(key, embedding)``) shared with others, or None.
        cache_key: the prefix of this image's keys in ``cache`` (the tile index is appended).
            Without ``cache`` and ``cache_key``, the tiles of this image are kept in a cache of
            its own, bounded as the engine's (512 MiB, least recently used tiles out).

    Attributes:
        computed: tile indices embedded by the encoder, in order (counts lazy work).
        loaded: tile indices read from the store, in order.
        contrast_limits: the mapping in use (None: uint8 pixels used as they are).

    Raises:
        ValueError: ``grid`` of another image shape; the image layout (as
            :func:`~napari_sam.utils.image.to_rgb_uint8`); a store that does not fit.
    """

    def __init__(
        self,
        predictor,
        image,
        grid: TileGrid,
        *,
        image_format: str = "RGB",
        contrast_limits: Optional[Sequence[float]] = None,
        store=None,
        plane_index: int = 0,
        cache=None,
        cache_key=None,
    ) -> None:
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
        shape = tuple(int(v) for v in image.shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise ValueError(
                "Expected an image of shape HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), channels last; "
                f"got shape {shape}."
            )
        if tuple(grid.image_shape) != shape[:2]:
            raise ValueError(f"The tile grid is for images of {grid.image_shape}, the image is {shape[:2]}.")
        self.predictor = predictor
        self.image = image
        self.grid = grid
        self.image_format = image_format
        dtype = np.dtype(image.dtype)
        limits = None if contrast_limits is None else tuple(float(v) for v in contrast_limits)
        if limits is not None and not (dtype == np.uint8 and limits == (0.0, 255.0)):
            low, high = limits
            self.contrast_limits: Optional[tuple[float, float]] = (low, high) if high > low else (low, low + 1.0)
        else:
            self.contrast_limits = shared_contrast_limits(image)
        self.store = store
        self.plane_index = int(plane_index)
        self.cache = cache
        self.cache_key = cache_key
        self.computed: list[int] = []
        self.loaded: list[int] = []
        if cache is None or cache_key is None:
            # Embeddings of this image alone, bounded like the engine's cache (a 10000 px image has
            # 169 vit_b tiles of 4 MiB): least recently used tiles are dropped and recomputed or re-read.
            from .interactive.engine import EmbeddingCache

            self._own = EmbeddingCache()
        if store is not None:
            stored = getattr(store, "precision", None)
            if stored is not None and stored != getattr(predictor, "precision", "fp32"):
                raise ValueError(
                    f"The embedding store holds {stored} embeddings; this predictor runs in "
                    f"{predictor.precision}: open the store with precision={predictor.precision!r}."
                )
            store.check_image(grid, dtype)

    def pixels(self, tile: Tile) -> np.ndarray:
        """The tile's crop of the image, as given (before the display mapping)."""
        return np.asarray(self.image[tile.crop_slices])

    def crop_rgb(self, tile: Tile, pixels: Optional[np.ndarray] = None) -> np.ndarray:
        """The tile's crop as SAM's HxWx3 uint8 input in the model's channel order."""
        from .utils.image import to_rgb_uint8

        crop = self.pixels(tile) if pixels is None else pixels
        if crop.dtype == np.uint8 and self.contrast_limits is not None:
            crop = crop.astype(np.float32)  # uint8 with other limits than (0, 255): mapped as napari shows it
        rgb = to_rgb_uint8(crop, self.contrast_limits)
        if self.image_format != self.predictor.model.image_format:
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        return rgb

    def cached(self, tile: Tile):
        """The tile's embedding when it is in memory, else None (no store read, no encoder work)."""
        if self.cache is not None and self.cache_key is not None:
            return self.cache.get((self.cache_key, tile.index))
        return self._own.get(tile.index)

    def _remember(self, tile: Tile, embedding) -> None:
        if self.cache is not None and self.cache_key is not None:
            self.cache.put((self.cache_key, tile.index), embedding)
        else:
            self._own.put(tile.index, embedding)

    def steps(self, tile: Tile, pixels: Optional[np.ndarray] = None):
        """The tile's embedding, as a generator that yields ``(steps_done, steps_total)`` while the
        encoder runs (nothing when it is cached or stored) and returns the
        :class:`~napari_sam.predictor.ImageEmbedding` (sizes in the crop's frame).

        Args:
            tile: a tile of :attr:`grid`.
            pixels: the tile's crop (:meth:`pixels`) when the caller has read it already, so
                that a lazy image on disk is read once; default: read here when needed.
        """
        embedding = self.cached(tile)
        if embedding is not None:
            return embedding
        if pixels is None:
            pixels = self.pixels(tile)
        if self.store is not None:
            embedding = self.store.load(self.plane_index, tile, self.contrast_limits, pixels)
            if embedding is not None:
                self.loaded.append(tile.index)
                self._remember(tile, embedding)
                return embedding
        rgb = self.crop_rgb(tile, pixels)
        # The predictor's own format is used: channel order was put right by crop_rgb.
        embedding = yield from self.predictor.embedding_steps(rgb, image_format=self.predictor.model.image_format)
        self.computed.append(tile.index)
        if self.store is not None:
            self.store.save(self.plane_index, tile, self.contrast_limits, pixels, embedding)
        self._remember(tile, embedding)
        return embedding

    def get(self, tile: Tile):
        """The tile's embedding (:meth:`steps` run to the end)."""
        from .utils.progress import drain

        return drain(self.steps(tile))
