"""``TiledAutomaticMaskGenerator``: automatic segmentation of a large image, tile by tile.

SAM resizes an image to its input size (1024 px, 256 for ``vit_small``), so on a large image
small objects shrink below what it can segment. This generator runs the automatic mask
generator (:class:`~napari_sam.SamAutomaticMaskGenerator`, one inner generator with the
same settings for every tile) on each tile's crop of a :class:`~napari_sam.tiling.TileGrid`
at native resolution, and merges the masks into one list of records in the reference's
format and the full-image frame.

Merge rule (in the tiling module's terms: a tile's *core* is the pixels it answers for, its
*crop* the core plus the halo, embedded; a crop edge is *inner* when it is not an image border):

1. Per tile, every mask is classified by its box (inclusive XYXY) in the crop:

   * *whole* when it does not touch an inner crop edge (it stays more than
     :data:`CUT_EDGE_TOLERANCE` px away from it), else *cut* (an object cut by the crop);
   * *owned* when the centre of its box lies in the tile's core (cores do not overlap, so
     each box centre has exactly one owner tile).

   Ranks: 0 whole and owned; 1 whole but owned by another tile; 2 cut. A cut mask is
   clipped to the tile's core (its *piece*; dropped when nothing is left): the cores
   partition the image, so the pieces of one object from different tiles never overlap.
2. Across tiles (pairs of masks from different tiles only: the inner generator already
   de-duplicated each tile, with its own NMS thresholds), a greedy non-maximum suppression
   in the order (rank, then predicted IoU, highest first) drops a mask that conflicts with a
   better, kept one: box IoU above ``box_nms_thresh`` (the reference's NMS criterion); mask
   IoU above :data:`DUPLICATE_MASK_IOU` (the same object seen by two tiles, whose boxes can
   differ by a sliver that one tile added); and, for a piece (rank 2), more than
   :data:`DUPLICATE_MASK_IOU` of its own pixels inside the kept mask (a piece of an object
   kept whole).

What this gives:

* An object whose box centre lies in a core and that reaches at most the halo (less the
  tolerance) beyond that core lies wholly inside the owner's crop: it comes out once, whole,
  from its owner (rank 0); the copies and pieces other tiles see are removed in step 2.
* An object that reaches further than the halo but lies whole in some other tile's crop
  (crops are shifted inwards at the image border, so the last tiles see more) is cut in
  its owner's crop and whole in that other crop: the whole version (rank 1) wins, so it
  still comes out once and whole.
* An object that no crop holds whole (larger than a crop, or reaching beyond the halo where
  no crop is larger) is cut in every tile that sees it. It is not lost, and not duplicated:
  it comes out as pieces, each tile's mask clipped to its core, which do not overlap and
  together cover what the tiles segmented of it; they are not stitched into one record.
  Raise ``halo`` (or ``tile_shape``) when objects are that large. A cut piece's record
  keeps the predicted IoU, stability score and prompt point of the mask it was cut from
  (the point may lie outside the piece); its ``area`` and ``bbox`` are the piece's.

``min_mask_region_area`` is applied per tile, by the inner generator, before the merge, on
the tile's crop; so a hole or island is judged inside one crop.

Memory: per tile, each mask is reduced at once to its box's pixels (bit-packed) and its
place in the image; nothing full-size is held per mask, except for ``output_mode=
"binary_mask"`` at the very end, where each record holds an HxW bool array (H * W bytes per
mask: 100 MB for one mask of a 10000 x 10000 image). Use ``"uncompressed_rle"`` or
``"coco_rle"`` for large images: their RLEs are built from the box's pixels and its offset
(:func:`crop_mask_to_rle`). Each tile's embedding is used once and then released (or
written to the embedding store, when one is given).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Generator, Optional, Sequence

import numpy as np
import torch

from .amg_settings import AmgSettings
from .automatic_mask_generator import SamAutomaticMaskGenerator
from .modeling import Sam
from .tiling import NoCache, ShapeLike, Tile, TileEmbeddings, TileGrid, default_halo, default_tile_shape
from .utils.amg import coco_encode_rle, generate_crop_boxes, mask_to_rle, rle_to_mask
from .utils.progress import drain, relabel

_logger = logging.getLogger(__name__)

__all__ = ["TiledAmgProgress", "TiledAutomaticMaskGenerator", "crop_mask_to_rle"]

#: A mask whose box comes within this many pixels of an inner crop edge (one that is not an
#: image border) counts as cut by the crop. SAM's upscaled masks of an object that continues
#: past the edge reach the last pixel row or column; one pixel of slack absorbs rounding.
CUT_EDGE_TOLERANCE = 1

#: Masks from different tiles with a mask IoU above this are one object seen twice; a cut
#: mask with more than this fraction of its pixels inside a kept mask is a piece of it.
DUPLICATE_MASK_IOU = 0.5


def crop_mask_to_rle(mask: np.ndarray, offset: Sequence[int], image_shape: Sequence[int]) -> dict[str, Any]:
    """The uncompressed RLE, in the full image's frame, of a mask given on a crop of it.

    Equal to padding ``mask`` with zeros to ``image_shape`` at ``offset`` and encoding the
    result as pycocotools does (column-major runs, starting with a run of zeros), without
    building the full-size mask.

    Args:
        mask: hxw bool (or 0/1) array, the mask on the crop.
        offset: (y0, x0) of the crop's top-left pixel in the image (row, column).
        image_shape: (H, W) of the image.

    Returns:
        ``{"size": [H, W], "counts": [int, ...]}`` (counts sum to H * W).

    Raises:
        ValueError: ``mask`` not 2-D, or the crop at ``offset`` not inside the image.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must be a 2-D hxw array, got shape {array.shape}.")
    height, width = (int(v) for v in image_shape)
    y0, x0 = (int(v) for v in offset)
    h, w = array.shape
    if y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
        raise ValueError(
            f"A {h}x{w} mask at offset (y0, x0) = ({y0}, {x0}) does not lie inside an image of (H, W) "
            f"({height}, {width})."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=bool))[None]
    return mask_to_rle(tensor, offset=(x0, y0), size=(height, width))[0]


@dataclass(frozen=True)
class TiledAmgProgress:
    """Progress of :meth:`TiledAutomaticMaskGenerator.generate_iter`.

    Yielded after every batch of points of every tile, and while a tile is embedded (after
    each image-encoder step, ``done`` unchanged), so that a caller can stop at any of them.

    Attributes:
        done: batches of points processed so far, over all tiles.
        total: batches of points of the whole run (``n_tiles`` x the batches of one tile,
            inner crop layers included; every crop has the same shape, so the same batches).
        tile_index: index of the current tile in the grid (row-major).
        n_tiles: number of tiles.
        masks_kept: masks kept so far by the per-tile rule (before the cross-tile merge).
        stage: "embedding" (the tile's image embedding is being computed) or "masks".
    """

    done: int
    total: int
    tile_index: int
    n_tiles: int
    masks_kept: int
    stage: str = "masks"

    @property
    def fraction(self) -> float:
        """done / total (1.0 when there is nothing to do)."""
        return self.done / self.total if self.total else 1.0


@dataclass
class _Candidate:
    """One mask kept by the per-tile rule, in compact form (full-image frame).

    ``box`` is the inclusive XYXY box; ``bits`` the bit-packed pixels of the box (row-major,
    ``(y1 - y0 + 1) x (x1 - x0 + 1)``); ``record`` the inner record with its coordinates moved
    to the full frame and no segmentation.
    """

    tile: int
    rank: int
    box: tuple[int, int, int, int]
    bits: np.ndarray
    record: dict[str, Any]

    @property
    def box_shape(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        return y1 - y0 + 1, x1 - x0 + 1

    def mask(self) -> np.ndarray:
        """The box's pixels as an hxw bool array."""
        h, w = self.box_shape
        return np.unpackbits(self.bits, count=h * w).reshape(h, w).astype(bool)


class TiledAutomaticMaskGenerator:
    """Automatic mask generation on a large image, tile by tile, merged across tile borders.

    See the module docstring for the merge rule and what it does to objects larger than the
    halo.

    Args:
        sam_model: the SAM model.
        tile_shape: (th, tw) (or an int) of each embedded crop, halo included; default the
            model's input size (``sam_model.image_encoder.img_size``), so that crops are
            embedded at native resolution.
        halo: (hy, hx) (or an int) of context around each core; default an eighth of the
            tile shape (:func:`~napari_sam.tiling.default_halo`).
        settings: the AMG settings (:class:`~napari_sam.AmgSettings`; default its defaults);
            keywords in ``amg_settings`` override its fields. Keyword only.
        precision: "fp32", "bf16" or "fp16", as :class:`~napari_sam.SamAutomaticMaskGenerator`.
            Keyword only.
        store: an embedding store (see :class:`~napari_sam.tiling.TileStoreProtocol`, e.g.
            :class:`~napari_sam.EmbeddingStore`) from which tile embeddings are read and to
            which computed ones are written; None: none. Keyword only.
        **amg_settings: settings by name (``points_per_side=...``), validated as by
            :class:`~napari_sam.SamAutomaticMaskGenerator`.

    Attributes:
        settings: the :class:`~napari_sam.AmgSettings` in use (``output_mode`` as asked).
        tile_shape, halo: (y, x) pairs in use.
        grid: the :class:`~napari_sam.tiling.TileGrid` of the last image (None before).
        embeddings: the :class:`~napari_sam.tiling.TileEmbeddings` of the last image (its
            ``computed`` and ``loaded`` lists say which tiles the encoder embedded and which
            came from the store); None before the first run.

    Raises:
        TypeError, ValueError: as :class:`~napari_sam.SamAutomaticMaskGenerator` for the
            settings; a tile shape or halo that :class:`~napari_sam.TileGrid` refuses.
    """

    def __init__(
        self,
        sam_model: Sam,
        tile_shape: Optional[ShapeLike] = None,
        halo: Optional[ShapeLike] = None,
        *,
        settings: Optional[AmgSettings] = None,
        precision: str = "fp32",
        store=None,
        **amg_settings: Any,
    ) -> None:
        # The plain generator's constructor validates the settings (and imports pycocotools
        # for coco_rle); the one used for the tiles returns crop-frame RLEs, whatever the output mode.
        checked = SamAutomaticMaskGenerator(sam_model, settings=settings, precision=precision, **amg_settings)
        self.settings: AmgSettings = checked.settings
        self.output_mode = self.settings.output_mode
        self._amg = SamAutomaticMaskGenerator(
            sam_model, settings=self.settings.replace(output_mode="uncompressed_rle"), precision=precision
        )
        del checked
        input_size = int(sam_model.image_encoder.img_size)
        self.tile_shape = TileGrid((1, 1), tile_shape if tile_shape is not None else default_tile_shape(input_size),
                                   0).tile_shape
        self.halo = TileGrid((1, 1), self.tile_shape, halo if halo is not None else default_halo(self.tile_shape)).halo
        self.precision = precision
        self.store = store
        self.grid: Optional[TileGrid] = None
        self.embeddings: Optional[TileEmbeddings] = None

    @property
    def predictor(self):
        """The :class:`~napari_sam.SamPredictor` that embeds the tiles and decodes the masks."""
        return self._amg.predictor

    # -- public API --------------------------------------------------------------------------

    def generate(
        self, image, contrast_limits: Optional[Sequence[float]] = None, *, plane_index: int = 0
    ) -> list[dict[str, Any]]:
        """Generate masks for ``image`` (runs :meth:`generate_iter` to the end).

        Args:
            image: HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) array of any real dtype; numpy, or
                any array that can be sliced lazily (zarr, dask): only one tile's crop is read
                at a time (plus a strided sample for the display mapping of non-uint8 data).
            contrast_limits: (low, high) mapped to 0 and 255 for every tile of a non-uint8
                image; default :func:`~napari_sam.tiling.shared_contrast_limits` (one mapping
                for the whole image, so that neighbouring tiles agree).
            plane_index: which plane of the store's image this is (0 for a 2-D image; the
                slice index of a stack). Keyword only.

        Returns:
            One record per mask, the reference's keys, in the full image's frame: ``segmentation``
            (HxW bool array, or an RLE dict per ``output_mode``; a bool array costs H * W bytes
            per mask, so use an RLE mode for large images), ``area`` (int pixels),
            ``bbox`` ([x0, y0, w, h] ints, inclusive: w = x_max - x_min), ``predicted_iou``,
            ``point_coords`` ([[x, y]]), ``stability_score`` and ``crop_box`` ([x0, y0, w, h]
            of the tile's crop, or of the inner crop when ``crop_n_layers`` > 0). Records come
            in tile order (row-major), each tile's in the inner generator's order.

        Raises:
            ValueError: an image of another layout, or a store that does not fit it.
        """
        return drain(self.generate_iter(image, contrast_limits, plane_index=plane_index))

    def generate_iter(
        self, image, contrast_limits: Optional[Sequence[float]] = None, *, plane_index: int = 0
    ) -> Generator[TiledAmgProgress, None, list[dict[str, Any]]]:
        """Generate masks tile by tile, yielding :class:`TiledAmgProgress`; returns the records.

        The records are the generator's return value (``StopIteration.value``, or
        ``records = yield from gen.generate_iter(image)``). To cancel, stop iterating and
        call ``close()``: the current tile's work stops at its next step and everything is
        released (embeddings already written to the store stay there).

        Args, Returns, Raises: as :meth:`generate`.
        """
        shape = tuple(int(v) for v in image.shape)
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
            raise ValueError(
                "Expected an image of shape HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), channels last; "
                f"got shape {shape}."
            )
        grid = TileGrid(shape[:2], self.tile_shape, self.halo)
        embeddings = TileEmbeddings(
            self.predictor, image, grid, contrast_limits=contrast_limits, store=self.store,
            plane_index=plane_index, cache=NoCache(), cache_key="tiled-amg",
        )
        self.grid, self.embeddings = grid, embeddings
        per_tile = self._batches_per_tile(grid.tiles[0].crop_shape)
        total = per_tile * len(grid)
        candidates: list[_Candidate] = []
        for tile in grid:
            base = tile.index * per_tile
            pixels = embeddings.pixels(tile)  # read once: for the embedding (and the store) and the inner generator
            kept = len(candidates)
            embedding = yield from relabel(
                embeddings.steps(tile, pixels),
                lambda _: TiledAmgProgress(base, total, tile.index, len(grid), kept, "embedding"),
            )
            rgb = embeddings.crop_rgb(tile, pixels)
            records = yield from relabel(
                self._amg.generate_iter(rgb, image_embedding=embedding),
                lambda progress: TiledAmgProgress(base + progress.done, total, tile.index, len(grid), kept),
            )
            del embedding, rgb, pixels
            candidates.extend(self._tile_candidates(grid, tile, records))
            del records
        keep = self._merge(candidates)
        return [self._record(candidates[i], grid.image_shape) for i in keep]

    # -- steps -------------------------------------------------------------------------------

    def _batches_per_tile(self, crop_shape: tuple[int, int]) -> int:
        """Batches of points the inner generator runs on a crop of ``crop_shape`` (all crop layers)."""
        amg = self._amg
        _, layers = generate_crop_boxes(crop_shape, amg.crop_n_layers, amg.crop_overlap_ratio)
        return sum(-(-len(amg.point_grids[layer]) // amg.points_per_batch) for layer in layers)

    @staticmethod
    def _tile_candidates(grid: TileGrid, tile: Tile, records: list[dict[str, Any]]) -> list[_Candidate]:
        """The tile's masks that the per-tile rule keeps, in compact full-frame form."""
        height, width = grid.image_shape
        cy0, cx0, cy1, cx1 = tile.crop
        crop_h, crop_w = tile.crop_shape
        tol = CUT_EDGE_TOLERANCE
        core_y0, core_x0, core_y1, core_x1 = tile.core
        out = []
        for record in records:
            bx, by, bw, bh = (int(v) for v in record["bbox"])  # crop frame, inclusive: x1 = bx + bw
            cut = (
                (cx0 > 0 and bx <= tol)
                or (cy0 > 0 and by <= tol)
                or (cx1 < width and bx + bw >= crop_w - 1 - tol)
                or (cy1 < height and by + bh >= crop_h - 1 - tol)
            )
            box = (bx + cx0, by + cy0, bx + bw + cx0, by + bh + cy0)
            pixels = rle_to_mask(record["segmentation"])[by : by + bh + 1, bx : bx + bw + 1]
            area = int(record["area"])
            if cut:
                # The piece inside the core (full-frame inclusive box clipped to the half-open core).
                x0, y0 = max(box[0], core_x0), max(box[1], core_y0)
                x1, y1 = min(box[2], core_x1 - 1), min(box[3], core_y1 - 1)
                if x1 < x0 or y1 < y0:
                    continue
                pixels = pixels[y0 - box[1] : y1 - box[1] + 1, x0 - box[0] : x1 - box[0] + 1]
                rows, cols = np.nonzero(pixels)
                if len(rows) == 0:
                    continue
                pixels = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                box = (x0 + int(cols.min()), y0 + int(rows.min()), x0 + int(cols.max()), y0 + int(rows.max()))
                area, rank = len(rows), 2
            else:
                owned = grid.tile_at((box[1] + box[3]) / 2, (box[0] + box[2]) / 2).index == tile.index
                rank = 0 if owned else 1
            (px, py), (kx, ky, kw, kh) = record["point_coords"][0], record["crop_box"]
            moved = {
                "area": area,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "predicted_iou": record["predicted_iou"],
                "point_coords": [[px + cx0, py + cy0]],
                "stability_score": record["stability_score"],
                "crop_box": [kx + cx0, ky + cy0, kw, kh],
            }
            out.append(_Candidate(tile.index, rank, box, np.packbits(pixels, axis=None), moved))
        return out

    def _merge(self, candidates: list[_Candidate]) -> list[int]:
        """Indices of the candidates kept by the cross-tile suppression (step 2 of the rule), ascending."""
        if not candidates:
            return []
        boxes = torch.tensor([c.box for c in candidates], dtype=torch.float32)
        tiles = torch.tensor([c.tile for c in candidates])
        # Inclusive boxes, as the inner generator's NMS (the reference's) treats them.
        from torchvision.ops import box_iou

        order = sorted(range(len(candidates)), key=lambda i: (candidates[i].rank, -candidates[i].record["predicted_iou"], i))
        kept: list[int] = []
        kept_mask = torch.zeros(len(candidates), dtype=torch.bool)
        for i in order:
            others = (kept_mask & (tiles != tiles[i])).nonzero().squeeze(1)
            if len(others):
                ious = box_iou(boxes[i : i + 1], boxes[others])[0]
                if bool((ious > self.settings.box_nms_thresh).any()):
                    continue
                touching = others[self._boxes_intersect(boxes[i], boxes[others])]
                if any(self._duplicate(candidates[int(j)], candidates[i]) for j in touching):
                    continue
            kept.append(i)
            kept_mask[i] = True
        return sorted(kept)

    @staticmethod
    def _boxes_intersect(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Which inclusive XYXY ``boxes`` share a pixel with ``box``."""
        return (
            (boxes[:, 0] <= box[2]) & (box[0] <= boxes[:, 2]) & (boxes[:, 1] <= box[3]) & (box[1] <= boxes[:, 3])
        )

    @staticmethod
    def _duplicate(kept: _Candidate, other: _Candidate) -> bool:
        """Whether ``other`` repeats ``kept`` (mask IoU), or is a piece of it (its pixels inside)."""
        x0, y0 = max(kept.box[0], other.box[0]), max(kept.box[1], other.box[1])
        x1, y1 = min(kept.box[2], other.box[2]), min(kept.box[3], other.box[3])
        a, b = kept.mask(), other.mask()
        inter = int(
            np.count_nonzero(
                a[y0 - kept.box[1] : y1 - kept.box[1] + 1, x0 - kept.box[0] : x1 - kept.box[0] + 1]
                & b[y0 - other.box[1] : y1 - other.box[1] + 1, x0 - other.box[0] : x1 - other.box[0] + 1]
            )
        )
        area_a, area_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
        union = area_a + area_b - inter
        if union and inter / union > DUPLICATE_MASK_IOU:
            return True
        return other.rank == 2 and area_b > 0 and inter / area_b > DUPLICATE_MASK_IOU

    def _record(self, candidate: _Candidate, image_shape: tuple[int, int]) -> dict[str, Any]:
        """The candidate's record, its segmentation in ``output_mode`` (full frame)."""
        x0, y0, x1, y1 = candidate.box
        if self.output_mode == "binary_mask":
            segmentation: Any = np.zeros(image_shape, dtype=bool)
            segmentation[y0 : y1 + 1, x0 : x1 + 1] = candidate.mask()
        else:
            segmentation = crop_mask_to_rle(candidate.mask(), (y0, x0), image_shape)
            if self.output_mode == "coco_rle":
                segmentation = coco_encode_rle(segmentation)
        return {"segmentation": segmentation, **candidate.record}
