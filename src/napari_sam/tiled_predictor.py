"""``TiledPredictor``: interactive SAM prompts on images far larger than the model's input.

A drop-in for :class:`~napari_sam.SamPredictor` on large 2-D images: the image is cut into
the tiles of a :class:`~napari_sam.tiling.TileGrid` (each embedded at native resolution with a
halo of context), a tile is embedded only when a prompt first needs it, and every prompt is
answered by one tile's embedding. Prompts and returned masks are in the full image's frame.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from .modeling import Sam
from .predictor import SamPredictor, checked_prompts
from .tiling import ShapeLike, Tile, TileEmbeddings, TileGrid, anchor_point, default_halo, default_tile_shape

_logger = logging.getLogger(__name__)

#: The logit given to pixels outside the answering tile's crop in full-frame ``return_logits``
#: output: minus infinity (sigmoid 0, below any mask threshold; the tile has no evidence there).
OUTSIDE_CROP_LOGIT = -np.inf


class TiledPredictor:
    """Predict masks for prompts on a large 2-D image, one lazily embedded tile per prompt.

    The image is divided by a :class:`~napari_sam.tiling.TileGrid`: tile cores cover the image
    without overlap, and each tile's crop (core plus ``halo`` on each side, shifted inside the
    image) is what the image encoder sees, at native resolution when ``tile_shape`` is the
    model's input size. An image no larger than one tile is a single tile: the untiled
    prediction.

    **Which tile answers a prompt** (:meth:`tile_for`, rule of
    :func:`~napari_sam.tiling.anchor_point`): the tile whose core holds the anchor point,
    which is the centre of the box when there is one (a box spanning tiles is answered by the
    tile holding its centre); otherwise the mean of the positive points; otherwise the mean
    of all points. Points outside the image count for the nearest core. The whole prompt is
    then given to that tile, shifted into its crop's frame; prompt parts outside the crop
    still act as in SAM (coordinates outside the image). An object whose anchor lies in a
    core and that reaches at most ``halo`` beyond the core lies wholly in the crop and comes
    out whole; larger objects are cut at the crop's edge.

    **Laziness**: :meth:`set_image` does no encoder work and converts no pixels; a prompt
    embeds its tile on first use (from the memory cache, the ``store``, or the image encoder,
    see :class:`~napari_sam.tiling.TileEmbeddings`), reading only that tile's crop of the
    image (zarr, dask and memory-mapped arrays are read lazily). ``embeddings.computed`` and
    ``embeddings.loaded`` list the tiles embedded and read back. Repeated prompts on the same
    tile reuse the predictor state (and the mask decoder's per-image work).

    **Stacks**: a TiledPredictor holds one 2-D image. For a stack or a time-lapse the caller
    sets one plane at a time (``set_image(stack[i], plane_index=i)``; ``plane_index`` selects
    the plane in the embedding store).

    Args:
        sam_model: the model.
        tile_shape: (th, tw) (or an int) of each embedded crop, halo included; default the
            model's input size (``sam_model.image_encoder.img_size``, square: 1024 for vit_b,
            256 for vit_small), so crops are embedded without resizing.
        halo: (hy, hx) (or an int) of context around each core; default an eighth of
            ``tile_shape`` (:func:`~napari_sam.tiling.default_halo`). ``2 * halo < tile_shape``.
        store: an embedding store (:class:`~napari_sam.tiling.TileStoreProtocol`, e.g.
            :class:`napari_sam.EmbeddingStore`) to read tile embeddings from and write new ones
            to, or None.
        precision: the internal :class:`~napari_sam.SamPredictor`'s precision ("fp32", "bf16",
            "fp16").
        cache: a memory cache shared with others (``get(key)`` / ``put(key, embedding)``, e.g.
            the engine's ``EmbeddingCache``), used with ``set_image(..., cache_key=...)``;
            without one (or without a key) each image's tile embeddings are kept until the
            next :meth:`set_image`.

    Attributes:
        predictor: the internal :class:`~napari_sam.SamPredictor`, holding the last answering
            tile's embedding.
        grid: the image's :class:`~napari_sam.tiling.TileGrid` (None before :meth:`set_image`).
        embeddings: the image's :class:`~napari_sam.tiling.TileEmbeddings` (None before).
        is_image_set: whether an image is set.
        original_size: (H, W) of the full image (None before :meth:`set_image`).
        tile_shape, halo: (y, x) pairs in use.

    Raises:
        ValueError: non-positive tile shape, negative halo, or ``2 * halo >= tile_shape``;
            an unknown precision.
    """

    def __init__(
        self,
        sam_model: Sam,
        tile_shape: Optional[ShapeLike] = None,
        halo: Optional[ShapeLike] = None,
        store=None,
        *,
        precision: str = "fp32",
        cache=None,
    ) -> None:
        if tile_shape is None:
            tile_shape = default_tile_shape(sam_model.image_encoder.img_size)
        if halo is None:
            halo = default_halo(tile_shape)
        probe = TileGrid((1, 1), tile_shape, halo)  # the grid's own validation, before any image
        self.tile_shape: tuple[int, int] = probe.tile_shape
        self.halo: tuple[int, int] = probe.halo
        self.model = sam_model
        self.store = store
        self.cache = cache
        self.predictor = SamPredictor(sam_model, precision=precision)
        self.reset_image()

    def reset_image(self) -> None:
        """Forget the current image, its tiles and their in-memory embeddings (not the store's)."""
        self.predictor.reset_image()
        self.grid: Optional[TileGrid] = None
        self.embeddings: Optional[TileEmbeddings] = None
        self.original_size: Optional[tuple[int, int]] = None
        self.is_image_set = False
        self._current_tile: Optional[int] = None  # the tile whose embedding the predictor holds

    def set_image(
        self,
        image,
        image_format: str = "RGB",
        contrast_limits: Optional[Sequence[float]] = None,
        *,
        plane_index: int = 0,
        cache_key=None,
    ) -> None:
        """Set a (large) 2-D image; nothing is embedded and no pixel is read or converted yet.

        Args:
            image: HxW, HxWx1, HxWx3 (RGB or BGR) or HxWx4 (RGBA) array of any real dtype,
                channels last, as :meth:`napari_sam.SamPredictor.set_image` takes; a numpy
                array or any lazily sliced array with ``shape``, ``dtype`` and numpy-style
                slicing (zarr, dask, ``np.memmap``): only the crops of tiles that prompts
                touch are read. For a stack, pass one plane (see the class docstring).
            image_format: "RGB" or "BGR", the channel order of ``image``.
            contrast_limits: (low, high) intensities mapped to 0 and 255, the same for every
                tile, as napari displays the image (uint8 data too, unless the limits are
                (0, 255); :meth:`napari_sam.SamPredictor.set_image` ignores them for uint8);
                default one robust mapping for the whole image
                (:func:`~napari_sam.tiling.shared_contrast_limits`, from a bounded subsample;
                none for uint8).
            plane_index: which plane of the store's image this is (0 for a 2-D image, ``i``
                for ``stack[i]``).
            cache_key: this image's key prefix in the shared ``cache`` (tile index appended).

        Raises:
            ValueError: an unknown image_format; a shape that is not one 2-D image (a 3-D
                array that is not HxWxC with C in 1, 3, 4, such as a stack, is refused with
                a message saying to set its planes one by one); an empty image;
                contrast_limits that are not (low, high) with low < high; a store that does
                not fit the image or the tiling (``StoreMismatchError``).
            TypeError: a dtype that is not real (complex, object, strings).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
        if not hasattr(image, "shape") or not hasattr(image, "dtype"):
            image = np.asarray(image)
        shape = tuple(int(v) for v in image.shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise ValueError(
                "TiledPredictor takes one 2-D image: HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), "
                f"channels last; got shape {shape}. For a stack or a time-lapse, set one plane at a time: "
                "set_image(stack[i], plane_index=i)."
            )
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"Expected a non-empty image, got shape {shape}.")
        dtype = np.dtype(image.dtype)
        if dtype.kind not in "biuf":
            raise TypeError(f"Expected a real-valued image (bool, integer or float), got dtype {dtype}.")
        if contrast_limits is not None:
            limits = np.asarray(contrast_limits, dtype=float).ravel()
            if limits.shape != (2,) or not np.isfinite(limits).all() or not limits[1] > limits[0]:
                raise ValueError(
                    f"contrast_limits must be (low, high) with low < high, got {tuple(contrast_limits)}."
                )
        self.reset_image()
        grid = TileGrid(shape[:2], self.tile_shape, self.halo)
        self.embeddings = TileEmbeddings(
            self.predictor, image, grid, image_format=image_format, contrast_limits=contrast_limits,
            store=self.store, plane_index=plane_index, cache=self.cache, cache_key=cache_key,
        )
        self.grid = grid
        self.original_size = grid.image_shape
        self.is_image_set = True
        _logger.debug("Tiled image set: %r", grid)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def tile_for(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
    ) -> Tile:
        """The tile that answers a prompt (rule in the class docstring); no embedding work.

        Args:
            point_coords: Nx2 (x, y) pixel coordinates in the full image, finite.
            point_labels: N labels, 1 positive point, 0 negative point (-1 padding).
            box: XYXY box (shape 4 or 1x4) in full-image pixels, finite.

        Returns:
            The :class:`~napari_sam.tiling.Tile` whose core holds the prompt's anchor point.

        Raises:
            RuntimeError: no image set.
            ValueError: neither a point nor a box (a mask prompt alone does not say where);
                malformed or non-finite prompts, labels other than 1/0/-1 (as
                :meth:`napari_sam.SamPredictor.predict`).
        """
        self._require_image()
        coords, labels, box = checked_prompts(point_coords, point_labels, box)
        if (coords is None or len(coords) == 0) and box is None:
            raise ValueError(
                "A tiled prediction needs a prompt point (point_coords with point_labels) or a box: "
                "they choose the tile that answers; a mask_input alone does not say where."
            )
        y, x = anchor_point(coords, labels, box)
        return self.grid.tile_at(y, x)

    def embedding_steps(self, tile: Tile):
        """The tile's embedding as a progress generator (``self.embeddings.steps(tile)``).

        Yields ``(steps_done, steps_total)`` while the image encoder runs (nothing when the
        tile is cached or stored) and returns the :class:`~napari_sam.predictor.ImageEmbedding`
        (sizes in the crop's frame). Run it before :meth:`predict` to show progress; the
        prediction then finds the embedding in memory.

        Raises:
            RuntimeError: no image set.
        """
        self._require_image()
        return self.embeddings.steps(tile)

    def predict(
        self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True, return_logits: bool = False, return_crop: bool = False,
    ):
        """Predict masks for a prompt given in the full image's frame.

        The answering tile (:meth:`tile_for`) is embedded if needed, the prompts are shifted
        into its crop's frame (points and box minus the crop's (x0, y0)), and the internal
        :class:`~napari_sam.SamPredictor` predicts on that tile's embedding, so the result
        equals ``SamPredictor.set_image(image[tile.crop_slices]).predict(shifted prompts)``.

        Args:
            point_coords: Nx2 (x, y) pixel coordinates in the full image, finite.
            point_labels: N labels: 1 positive point, 0 negative point (-1 padding).
            box: XYXY box (shape 4 or 1x4) in full-image pixels, finite.
            mask_input: 1xhxw low-res logits (the third output) of a previous prediction on the
                SAME tile (it is in that tile's crop frame; this is not checked); needs a
                point or a box too, to choose the tile.
            multimask_output: 3 masks instead of 1.
            return_logits: float32 logits instead of boolean masks.
            return_crop: return the masks of the tile's crop and its offset instead of
                full-image masks (saves memory on large images).

        Returns:
            Without ``return_crop``: ``(masks, iou, low_res)``: masks CxHxW over the full image
            (bool; or float32 logits with :data:`OUTSIDE_CROP_LOGIT` (-inf) outside the crop),
            predicted IoU C (float32), low-res logits Cxhxw (float32, crop frame: the model's
            low-res size, e.g. 128x128 for vit_small), C = 3 or 1. With ``return_crop``:
            ``(masks, iou, low_res, offset)``: masks Cxh'xw' of the crop and its (y0, x0)
            offset in the full image (``full[:, y0:y0 + h', x0:x0 + w'] = masks``).

        Raises:
            RuntimeError: no image set.
            ValueError: no point and no box; points without labels, labels other than
                1/0/-1, NaN or infinite coordinates, malformed shapes (the messages of
                :meth:`napari_sam.SamPredictor.predict`); a mask_input of the wrong size.
        """
        tile = self.tile_for(point_coords, point_labels, box)
        if self._current_tile != tile.index:
            embedding = self.embeddings.get(tile)
            self.predictor.set_image_embedding(embedding)
            self._current_tile = tile.index
        y0, x0 = tile.offset
        shift = np.array([x0, y0], dtype=np.float64)
        crop_coords = None if point_coords is None else np.asarray(point_coords, dtype=np.float64) - shift
        crop_box = None if box is None else np.asarray(box, dtype=np.float64).reshape(-1) - np.tile(shift, 2)
        masks, iou, low_res = self.predictor.predict(
            point_coords=crop_coords, point_labels=point_labels, box=crop_box, mask_input=mask_input,
            multimask_output=multimask_output, return_logits=return_logits,
        )
        if return_crop:
            return masks, iou, low_res, (y0, x0)
        return self.paste(masks, tile), iou, low_res

    def paste(self, crop_masks: np.ndarray, tile: Tile) -> np.ndarray:
        """Crop masks Cxh'xw' (bool or float logits) placed in a full-image CxHxW array at the
        tile's offset; False (or :data:`OUTSIDE_CROP_LOGIT` for float logits) elsewhere.

        Raises:
            RuntimeError: no image set.
            ValueError: masks whose size is not the tile's crop size.
        """
        self._require_image()
        if tuple(crop_masks.shape[-2:]) != tile.crop_shape:
            raise ValueError(
                f"Crop masks of shape {tuple(crop_masks.shape)} do not fit tile {tile.index}'s crop {tile.crop_shape}."
            )
        height, width = self.original_size
        if crop_masks.dtype == np.bool_:
            full = np.zeros((*crop_masks.shape[:-2], height, width), dtype=np.bool_)
        else:
            full = np.full((*crop_masks.shape[:-2], height, width), OUTSIDE_CROP_LOGIT, dtype=crop_masks.dtype)
        full[(..., *tile.crop_slices)] = crop_masks
        return full


