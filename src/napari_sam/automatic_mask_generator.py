"""``SamAutomaticMaskGenerator``: segment everything by prompting SAM with a grid of points.

Drop-in for the reference's ``segment_anything.SamAutomaticMaskGenerator``: same
constructor, defaults and records, in the same order, for all three output modes, with crop
layers, cross-crop de-duplication and small-region clean-up (scikit-image instead of
OpenCV). The settings, their defaults and bounds are declared once, by
:class:`~napari_sam.amg_settings.AmgSettings`; the constructor also takes one as
``settings=``. Differences that do not change the records:

* the mask decoder runs through :class:`~napari_sam.modeling.prompt_batch_decoder.PromptBatchDecoder`
  (prompt-independent work once per image, attention factored through the few prompt tokens);
* masks are filtered by predicted IoU on the low-res logits, and only the survivors are
  upscaled, scored for stability, thresholded and run-length encoded, a few at a time
  (bounded memory: the reference holds full-resolution logits of 3 x points_per_batch masks);
* points reach the model as float32 (the reference passes float64, which MPS rejects);
* any image ``SamPredictor.set_image`` accepts (grayscale, RGBA, 16-bit, float) is converted
  once by :func:`~napari_sam.utils.image.to_rgb_uint8`;
* :meth:`SamAutomaticMaskGenerator.generate_iter` yields progress after every batch of
  points and can be stopped between batches (``close()`` the generator, or stop iterating).

Reference semantics kept (see ``docs``/``sam-reference.md`` section 2): predicted-IoU filter is
strict ``>`` and applied only when the threshold is > 0; stability ``>=``, only when > 0;
stability on full-resolution logits at +-offset; inclusive boxes; boxes within 20 px of a crop
edge that is not an image edge are dropped; NMS is torchvision's with the reference's scores
(predicted IoU within a crop, 1 / crop area across crops, 0/1 after small-region clean-up).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Generator, Optional, Sequence

import numpy as np
import torch

from .amg_settings import OUTPUT_MODES, AmgSettings  # noqa: F401  (OUTPUT_MODES: re-exported)
from .modeling import Sam
from .modeling.prompt_batch_decoder import PromptBatchDecoder
from .predictor import ImageEmbedding, SamPredictor, autocast_context
# The mask bookkeeping (RLE, boxes, crops, NMS, stability) lives in utils.amg, at the reference's paths.
from .utils.amg import (
    MaskData, area_from_rle, batch_iterator, batched_mask_to_box, box_xyxy_to_xywh, build_all_layer_point_grids,
    calculate_stability_score, coco_encode_rle, crop_box_scores, generate_crop_boxes, is_box_near_crop_edge,
    mask_to_rle, mask_to_rle_pytorch, nms_keep, remove_small_regions, rle_to_mask, uncrop_boxes_xyxy,
    uncrop_masks, uncrop_points,
)
from .utils.image import to_rgb_uint8
from .utils.progress import drain

_logger = logging.getLogger(__name__)

# The names the reference's module imports from its utils.amg are importable from here too
# (``from segment_anything.automatic_mask_generator import MaskData`` and the like).
__all__ = [
    "AmgProgress",
    "MaskData",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "Sam",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]

# Elements of float32 logits upscaled at once (256 MB); bounds memory on large images.
_UPSCALE_BUDGET = 1 << 26


@dataclass(frozen=True)
class AmgProgress:
    """Progress of :meth:`SamAutomaticMaskGenerator.generate_iter`, yielded after each batch.

    Attributes:
        done: batches of points processed so far (all crops).
        total: batches of points in the whole run.
        crop_index: 0-based index of the current crop (0 is the whole image).
        n_crops: number of crops.
        masks_so_far: masks kept so far (before the NMS of the current crop).
    """

    done: int
    total: int
    crop_index: int
    n_crops: int
    masks_so_far: int

    @property
    def fraction(self) -> float:
        """done / total (1.0 when there is nothing to do)."""
        return self.done / self.total if self.total else 1.0


def _no_masks() -> MaskData:
    """An empty batch with every field the generator fills (so concatenation keeps dtypes).

    Fields: ``rles`` (uncompressed RLEs, image frame), ``boxes`` (Kx4 int64 inclusive XYXY,
    crop frame until the crop is finished), ``iou_preds`` (K float32), ``points`` (Kx2
    float64 (x, y), crop frame until the crop is finished), ``stability_score`` (K float32),
    ``crop_boxes`` (Kx4 int64 XYXY).
    """
    return MaskData(
        rles=[],
        boxes=torch.zeros((0, 4), dtype=torch.int64),
        iou_preds=torch.zeros(0),
        points=torch.zeros((0, 2), dtype=torch.float64),
        stability_score=torch.zeros(0),
        crop_boxes=torch.zeros((0, 4), dtype=torch.int64),
    )


class SamAutomaticMaskGenerator:
    """Generate masks for a whole image from a grid of point prompts.

    Takes the reference's arguments, positional or keyword, in its order: the fields of
    :class:`~napari_sam.amg_settings.AmgSettings` (``points_per_side``, ``points_per_batch``,
    ``pred_iou_thresh``, ``stability_score_thresh``, ``stability_score_offset``,
    ``box_nms_thresh``, ``crop_n_layers``, ``crop_nms_thresh``, ``crop_overlap_ratio``,
    ``crop_n_points_downscale_factor``, ``point_grids``, ``min_mask_region_area``,
    ``output_mode``), whose docstring gives their meaning, defaults (the reference's) and
    bounds; ``inspect.signature`` shows them.

    Args:
        model: the SAM model.
        *args: settings by position, in the field order above.
        settings: the settings (default: ``AmgSettings()``); keywords given beside it
            override its fields. Keyword only.
        precision: "fp32" (the reference's results) or "bf16"/"fp16" (faster, approximate;
            see :class:`~napari_sam.predictor.SamPredictor`). Keyword only.
        **kwargs: settings by name.

    Attributes:
        settings: the :class:`~napari_sam.amg_settings.AmgSettings` in use; each field is
            also an attribute (``self.pred_iou_thresh`` ...), except ``point_grids``, which
            holds the grids built for every crop layer (Nx2 float64 normalised (x, y)).

    Raises:
        TypeError: too many positional arguments, an unknown keyword, a setting given both
            by position and by name, or a setting of the wrong type.
        ValueError: a setting out of bounds, both or neither of points_per_side /
            point_grids, too few point grids for the crop layers, unknown output_mode or
            precision.
    """

    def __init__(
        self, model: Sam, *args: Any, settings: Optional[AmgSettings] = None, precision: str = "fp32", **kwargs: Any
    ) -> None:
        base = settings if settings is not None else AmgSettings()
        names = type(base).field_names()
        if len(args) > len(names):
            raise TypeError(
                f"SamAutomaticMaskGenerator() takes at most {len(names) + 1} positional arguments after self "
                f"(model and the settings {', '.join(names)}), but {len(args) + 1} were given."
            )
        changes = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names:
                raise TypeError(f"SamAutomaticMaskGenerator() got an unexpected keyword argument {name!r}.")
            if name in changes:
                raise TypeError(f"SamAutomaticMaskGenerator() got multiple values for argument {name!r}.")
            changes[name] = value
        self.settings = base.replace(**changes) if changes else base
        if self.settings.output_mode == "coco_rle":
            import pycocotools.mask  # noqa: F401  (fail early, as the reference)

        self.predictor = SamPredictor(model, precision=precision)
        # The settings stay readable as attributes, under the constructor's names.
        for name, value in self.settings.as_kwargs().items():
            setattr(self, name, value)
        self.precision = precision
        if self.settings.points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(
                self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
            )
        else:
            self.point_grids = [np.asarray(grid, dtype=np.float64).reshape(-1, 2) for grid in self.settings.point_grids]

    # help() and inspect.signature show the reference's parameters and defaults, from AmgSettings.
    __init__.__signature__ = inspect.Signature([
        *list(inspect.signature(__init__).parameters.values())[:2],  # self, model
        *AmgSettings.parameters(),
        *[p for p in inspect.signature(__init__).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY],
    ])

    # -- public API --------------------------------------------------------------------------

    def generate(self, image: np.ndarray, contrast_limits: Optional[Sequence[float]] = None) -> list[dict[str, Any]]:
        """Generate masks for ``image`` (runs :meth:`generate_iter` to the end).

        Args:
            image: HxWx3 uint8 RGB as in the reference; also HxW, HxWx1, HxWx4 and non-uint8
                dtypes, converted by :func:`~napari_sam.utils.image.to_rgb_uint8`.
            contrast_limits: (low, high) for non-uint8 images (default: robust percentiles).

        Returns:
            One record per mask, in the reference's order (NMS keep order), each a dict with
            ``segmentation`` (HxW bool array, or an RLE dict per ``output_mode``), ``area``
            (int pixels), ``bbox`` ([x0, y0, w, h] ints, inclusive box: w = x_max - x_min),
            ``predicted_iou`` (float), ``point_coords`` ([[x, y]] floats, image frame),
            ``stability_score`` (float) and ``crop_box`` ([x0, y0, w, h] ints).
        """
        return drain(self.generate_iter(image, contrast_limits))

    def generate_iter(
        self,
        image: np.ndarray,
        contrast_limits: Optional[Sequence[float]] = None,
        *,
        image_embedding: Optional[ImageEmbedding] = None,
    ) -> Generator[AmgProgress, None, list[dict[str, Any]]]:
        """Generate masks, yielding an :class:`AmgProgress` after every batch of points.

        The records are the generator's return value (``StopIteration.value``; e.g.
        ``records = yield from amg.generate_iter(image)``, or napari's ``thread_worker``
        ``returned`` signal). To cancel, stop iterating and call ``close()`` (or drop the
        generator): the image embedding and all partial results are released. No autocast
        or no-grad state leaks into the caller between yields.

        Args:
            image: as :meth:`generate`.
            contrast_limits: as :meth:`generate`.
            image_embedding: the embedding of the whole ``image`` (as mapped by
                ``contrast_limits``), e.g. from a cache or an embedding store
                (:class:`~napari_sam.tiled_amg.TiledAutomaticMaskGenerator` passes each
                tile's). Used for the uncropped first crop layer instead of running the image
                encoder; crops of further layers (``crop_n_layers > 0``) are still embedded.
                Default None: the encoder embeds the image. Keyword only.

        Returns:
            The records of :meth:`generate`.

        Raises:
            ValueError: ``image_embedding`` computed from an image of another size, or one
                that does not fit the model (see :meth:`SamPredictor.set_image_embedding`).
        """
        rgb = to_rgb_uint8(image, contrast_limits)
        orig_size = rgb.shape[:2]
        if image_embedding is not None and tuple(image_embedding.original_size) != tuple(orig_size):
            raise ValueError(
                f"image_embedding was computed from an image of (H, W) {tuple(image_embedding.original_size)}; "
                f"the image is {tuple(orig_size)}."
            )
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        n_points = [len(self.point_grids[layer]) for layer in layer_idxs]
        total = sum(-(-n // self.points_per_batch) for n in n_points)
        done = 0
        kept = 0
        data = _no_masks()
        try:
            for crop_index, (crop_box, layer) in enumerate(zip(crop_boxes, layer_idxs)):
                x0, y0, x1, y1 = crop_box
                crop = rgb[y0:y1, x0:x1]
                crop_size = crop.shape[:2]
                if image_embedding is not None and layer == 0:
                    self.predictor.set_image_embedding(image_embedding)
                else:
                    self.predictor.set_image(crop)
                decoder = self.predictor.prompt_batch_decoder()
                # Grid (normalised x, y) scaled by the crop's (width, height), float64 as the reference.
                points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
                crop_data = _no_masks()
                for (batch_points,) in batch_iterator(self.points_per_batch, points):
                    with torch.no_grad():
                        batch = self._process_batch(decoder, batch_points, crop_box, crop_size, orig_size)
                    crop_data.cat(batch)
                    kept += len(batch["rles"])
                    done += 1
                    yield AmgProgress(done, total, crop_index, len(crop_boxes), kept)
                del decoder
                self.predictor.reset_image()
                self._finish_crop(crop_data, crop_box)
                data.cat(crop_data)
                del crop_data

            if len(crop_boxes) > 1 and len(data["rles"]):
                data.filter(nms_keep(data["boxes"], crop_box_scores(data["crop_boxes"]), self.crop_nms_thresh))
            if self.min_mask_region_area > 0:
                data = self.postprocess_small_regions(
                    data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
                )
            return self._records(data)
        finally:
            self.predictor.reset_image()

    # -- pipeline steps ----------------------------------------------------------------------------

    def _autocast(self):
        return autocast_context(self.predictor.device, self.precision)

    def _process_batch(
        self,
        decoder: PromptBatchDecoder,
        points: np.ndarray,
        crop_box: list[int],
        crop_size: tuple[int, int],
        orig_size: tuple[int, int],
    ) -> MaskData:
        """Predict, filter and encode the masks of one batch of points (crop frame)."""
        predictor = self.predictor
        model = predictor.model
        device = predictor.device
        coords = predictor.transform.apply_coords(points, crop_size)
        coords_t = torch.as_tensor(coords, dtype=torch.float32, device=device)[:, None, :]
        labels_t = torch.ones((len(points), 1), dtype=torch.int32, device=device)
        with self._autocast():
            sparse, _ = model.prompt_encoder(points=(coords_t, labels_t), boxes=None, masks=None)
            iou_preds, mask_tokens, image_tokens = decoder.run(sparse, multimask_output=True)
        n_out = iou_preds.shape[1]
        iou_flat = iou_preds.flatten()  # point-major, as the reference's flatten(0, 1)
        keep = torch.ones_like(iou_flat, dtype=torch.bool)
        if self.pred_iou_thresh > 0.0:
            keep = iou_flat > self.pred_iou_thresh
        candidates = keep.nonzero().squeeze(1)
        data = _no_masks()
        if len(candidates) == 0:
            return data
        with self._autocast():
            low_res = decoder.masks(
                mask_tokens, image_tokens, candidates // n_out, candidates % n_out, multimask_output=True
            )
        del mask_tokens, image_tokens

        height, width = crop_size
        side = model.image_encoder.img_size
        chunk = max(1, _UPSCALE_BUDGET // (side * side + height * width))
        for start in range(0, len(candidates), chunk):
            rows = candidates[start : start + chunk]
            logits = model.postprocess_masks(low_res[start : start + chunk, None], predictor.input_size, crop_size)[:, 0]
            stability = calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0.0:
                ok = stability >= self.stability_score_thresh
                logits, stability, rows = logits[ok], stability[ok], rows[ok.to(rows.device)]
            masks = logits > model.mask_threshold
            del logits
            boxes = batched_mask_to_box(masks)
            ok = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
            if not bool(ok.all()):
                masks, boxes, stability, rows = masks[ok], boxes[ok], stability[ok], rows[ok]
            rows_cpu = rows.cpu()
            data.cat(
                MaskData(
                    rles=mask_to_rle(masks, offset=crop_box[:2], size=orig_size),
                    boxes=boxes.cpu(),
                    iou_preds=iou_flat[rows].cpu(),
                    points=torch.as_tensor(points[(rows_cpu // n_out).numpy()]).reshape(-1, 2),
                    stability_score=stability.cpu(),
                    crop_boxes=torch.zeros((len(rows_cpu), 4), dtype=torch.int64),
                )
            )
            del masks
        return data

    def _finish_crop(self, data: MaskData, crop_box: list[int]) -> None:
        """In place: NMS within a crop (by predicted IoU), then boxes and points to the image frame."""
        if len(data["rles"]):
            data.filter(nms_keep(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.int64).reshape(-1, 4)

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fill small holes and remove small islands, then NMS away new duplicates.

        As the reference: unchanged masks score 1 and changed ones 0, so NMS (at
        ``nms_thresh``) prefers masks that needed no clean-up; only kept, changed masks get
        a new RLE and box. One full-size mask is decoded at a time.

        Args:
            mask_data: masks in the image frame, with at least the fields ``rles``
                (uncompressed RLEs) and ``boxes`` (Kx4 XYXY tensor); other fields are
                filtered along.
            min_area: regions (8-connected) smaller than this many pixels are small.
            nms_thresh: box IoU threshold of the NMS.

        Returns:
            ``mask_data`` itself, changed in place (as the reference): the kept masks, in NMS
            keep order.
        """
        if len(mask_data["rles"]) == 0:
            return mask_data
        new_boxes = []
        scores = []
        changed_rles: dict[int, dict[str, Any]] = {}
        for index, rle in enumerate(mask_data["rles"]):
            mask = rle_to_mask(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            changed = changed_holes or changed_islands
            mask_t = torch.from_numpy(mask)[None]
            new_boxes.append(batched_mask_to_box(mask_t)[0])
            scores.append(0.0 if changed else 1.0)
            if changed:
                changed_rles[index] = mask_to_rle(mask_t)[0]
        boxes = torch.stack(new_boxes)
        keep = nms_keep(boxes, torch.as_tensor(scores), nms_thresh)
        rles, old_boxes = mask_data["rles"], mask_data["boxes"]
        for index in keep.tolist():
            if index in changed_rles:
                rles[index] = changed_rles[index]
                old_boxes[index] = boxes[index]
        mask_data.filter(keep)
        return mask_data

    def _records(self, data: MaskData) -> list[dict[str, Any]]:
        """Encode masks per ``output_mode`` and build the reference's record dicts."""
        records = []
        boxes = data["boxes"].numpy()
        crop_boxes = data["crop_boxes"].numpy()
        points = data["points"].numpy()
        ious = data["iou_preds"].float().numpy()
        stability = data["stability_score"].float().numpy()
        for i, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                segmentation: Any = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append(
                {
                    "segmentation": segmentation,
                    "area": area_from_rle(rle),
                    "bbox": box_xyxy_to_xywh(boxes[i]).tolist(),
                    "predicted_iou": ious[i].item(),
                    "point_coords": [points[i].tolist()],
                    "stability_score": stability[i].item(),
                    "crop_box": box_xyxy_to_xywh(crop_boxes[i]).tolist(),
                }
            )
        return records
