"""``SamPredictor``: embed an image once, then predict masks for many prompts.

Drop-in for the reference's ``segment_anything.SamPredictor`` (same methods, arguments,
shapes, dtypes and coordinate frames), plus:

* ``set_image`` accepts grayscale, HxWx1, RGBA, uint16 and float images through
  :func:`napari_sam.utils.image.to_rgb_uint8` (``contrast_limits`` optional);
* an optional reduced-precision mode (``precision="bf16"`` on CPU or CUDA, ``"fp16"`` on
  CUDA), off by default; outputs are float32 in every mode;
* clear errors for missing or malformed prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import Sam

if TYPE_CHECKING:
    from .modeling.prompt_batch_decoder import PromptBatchDecoder
from .utils.image import to_rgb_uint8
from .utils.progress import drain
from .utils.transforms import ResizeLongestSide

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Smallest prompt batch for which the mask decoder runs in the reduced precision.
DECODER_REDUCED_PRECISION_MIN_BATCH = 16
#: Point labels the prompt encoder reads (as in the reference): 1 positive point, 0 negative
#: point, -1 padding (a point that is not a prompt, for batches with unequal point counts).
POINT_LABELS = (-1, 0, 1)
#: The low-res logits size of the official SAM models; mask prompts of this size are accepted
#: by every model (resized to the model's own low-res size, see ``SamPredictor.predict_torch``).
SAM_LOW_RES_SIZE = (256, 256)


def _point_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as int32 after checking that each is one of :data:`POINT_LABELS` (0.7 is not 0).

    Raises:
        ValueError: a label that is not -1, 0 or 1 (booleans count as 0 and 1).
    """
    values = np.asarray(labels)
    if values.dtype == bool:
        return values.astype(np.int32)
    if values.dtype.kind not in "iuf" or not np.isin(values, POINT_LABELS).all():
        bad = values if values.dtype.kind not in "iuf" else values[~np.isin(values, POINT_LABELS)]
        raise ValueError(
            f"point_labels must be 1 (positive point), 0 (negative point) or -1 (padding); got {bad.ravel()[:5]}."
        )
    return values.astype(np.int32)


def _check_finite(name: str, values: "np.ndarray | torch.Tensor", layout: str) -> None:
    """Raise ValueError when ``values`` holds NaN or infinity (they give empty masks and NaN IoU)."""
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(finite):
        raise ValueError(f"{name} must be finite {layout} pixel coordinates; got NaN or infinity.")


def checked_prompts(
    point_coords: Optional[np.ndarray], point_labels: Optional[np.ndarray], box: Optional[np.ndarray],
    several_boxes: str = "for several boxes, predict them one at a time",
) -> tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """The prompts of :meth:`SamPredictor.predict` checked (nothing about the image is needed):
    points Nx2 float64 (x, y), labels N int32, box (4,) float64 XYXY; None where not given.

    Args:
        point_coords, point_labels, box: as :meth:`SamPredictor.predict`.
        several_boxes: what the error for several boxes advises.

    Raises:
        ValueError: points without labels or labels without points, shapes other than Nx2 / N /
            4, values that are not numbers, labels other than 1/0/-1, NaN or infinity.
    """
    coords = labels = None
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels must be given with point_coords (1 positive, 0 negative).")
        coords = np.asarray(point_coords)
        labels = np.asarray(point_labels)
        if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != (coords.shape[0],):
            raise ValueError(
                f"point_coords must be Nx2 (x, y) and point_labels N; got {coords.shape} and {labels.shape}."
            )
        if len(coords):
            if coords.dtype.kind not in "biuf":
                raise ValueError(f"point_coords must be numbers, got dtype {coords.dtype}.")
            coords = coords.astype(np.float64)
            _check_finite("point_coords", coords, "Nx2 (x, y)")
            labels = _point_labels(labels)
    elif point_labels is not None:
        raise ValueError("point_labels given without point_coords.")
    if box is not None:
        box = np.asarray(box)
        if box.size != 4:
            raise ValueError(f"box must be one XYXY box of shape (4,) or (1, 4), got {box.shape}; {several_boxes}.")
        if box.dtype.kind not in "biuf":
            raise ValueError(f"box must be numbers, got dtype {box.dtype}.")
        box = box.astype(np.float64).reshape(4)
        _check_finite("box", box, "XYXY")
    return coords, labels, box


def _ordered_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Bx4 boxes with corners put in XYXY order (x0 <= x1, y0 <= y1): a box drawn from any corner
    means the same rectangle (the reference would give an empty mask for x1 < x0)."""
    corners = boxes.reshape(-1, 2, 2)
    return torch.cat([corners.amin(dim=1), corners.amax(dim=1)], dim=1)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Context that runs the model in ``precision`` ("fp32": a no-op) on ``device``.

    Raises:
        ValueError: unknown precision, or fp16 on a CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' needs a GPU; use 'bf16' on the CPU.")
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@dataclass(frozen=True)
class ImageEmbedding:
    """An image's embedding, with what is needed to predict masks without the image.

    Attributes:
        features: 1xCxGxG float32 tensor (1x256x64x64 for the official models).
        original_size: (H, W) of the image in pixels.
        input_size: (h, w) of the image resized to the model's input long side, before padding.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Memory held by the features, in bytes."""
        return int(self.features.element_size() * self.features.nelement())


class SamPredictor:
    """Predict masks for prompts on one image, reusing its image embedding.

    Args:
        sam_model: the model.
        precision: "fp32" (default, matches the reference), "bf16" (CPU or GPU, mask IoU >= 0.97
            against fp32; on a CPU it is faster only where torch's bf16 matrix products are
            faster than fp32 ones, which ``experiments/bench_bf16_gemm.py`` measures) or "fp16"
            (GPU only). It applies to the image encoder, and to the mask decoder for
            batches of at least 16 prompts.

    Attributes:
        model, transform (``ResizeLongestSide`` to 1024), features (1x256x64x64 image
        embedding, float32), is_image_set, original_size (H, W), input_size (h, w) of the
        resized image before padding.
    """

    def __init__(self, sam_model: Sam, precision: str = "fp32") -> None:
        autocast_context(sam_model.device, precision)  # validate early
        self.model = sam_model
        self.precision = precision
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.precision)

    def set_image(
        self, image: np.ndarray, image_format: str = "RGB",
        contrast_limits: Optional[Sequence[float]] = None,
    ) -> None:
        """Compute the image embedding of ``image``.

        Args:
            image: HxWx3 uint8 RGB (or BGR) as in the reference; also HxW, HxWx1, HxWx4 and
                non-uint8 dtypes, converted by :func:`~napari_sam.utils.image.to_rgb_uint8`.
            image_format: "RGB" or "BGR", the channel order of ``image``.
            contrast_limits: (low, high) mapped to 0 and 255 for non-uint8 images; default:
                the 0.5th and 99.5th percentiles.

        Raises:
            ValueError: unknown image_format or an image shape that is not an image.
        """
        tensor, original_size = self._prepare(image, image_format, contrast_limits)
        self.set_torch_image(tensor, original_size)

    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Compute the image embedding of an image already resized by ``self.transform``.

        Args:
            transformed_image: 1x3xhxw tensor (uint8 or float, 0-255 units) with long side 1024.
            original_image_size: (H, W) of the image before resizing.

        Raises:
            ValueError: not 1x3xhxw with long side 1024.
        """
        self.reset_image()
        self.set_image_embedding(drain(self._encoder_steps(transformed_image, original_image_size)))

    def embedding_steps(
        self, image: np.ndarray, image_format: str = "RGB", contrast_limits: Optional[Sequence[float]] = None,
    ) -> Generator[tuple[int, int], None, ImageEmbedding]:
        """Compute the image embedding of ``image`` step by step, without setting it.

        A generator: yields ``(steps_done, steps_total)`` after preprocessing and after every
        image-encoder block, so that a caller can show progress or stop between blocks, and
        returns the :class:`ImageEmbedding` (``StopIteration.value``, or
        ``embedding = yield from predictor.embedding_steps(image)``). The result equals what
        :meth:`set_image` computes; pass it to :meth:`set_image_embedding`. No-grad and
        autocast are entered per step, never across a yield.

        Args:
            image, image_format, contrast_limits: as :meth:`set_image`.

        Raises:
            ValueError: as :meth:`set_image`.
        """
        tensor, original_size = self._prepare(image, image_format, contrast_limits)
        return (yield from self._encoder_steps(tensor, original_size))

    def set_image_embedding(self, embedding: ImageEmbedding) -> None:
        """Use a precomputed image embedding (from :meth:`embedding_steps`, :attr:`image_embedding`,
        a cache or a file) as the current image; no encoder work.

        Args:
            embedding: features 1xCxGxG (C, G: the model's embedding channels and grid, 256 and
                64 for the official models), with the original (H, W) and resized (h, w) sizes
                of the image it was computed from. Features move to the model's device as float32.

        Raises:
            ValueError: features of another shape than this model's embedding, or sizes that
                do not match (the resized long side must be the model's input size).
        """
        encoder = self.model.image_encoder
        channels = self.model.prompt_encoder.embed_dim
        grid = self.model.prompt_encoder.image_embedding_size
        expected = (1, channels, *grid)
        features = embedding.features
        if tuple(features.shape) != expected:
            raise ValueError(
                f"The image embedding has shape {tuple(features.shape)}; this model expects {expected} (1xCxGxG)."
            )
        original, resized = tuple(int(v) for v in embedding.original_size), tuple(int(v) for v in embedding.input_size)
        if len(original) != 2 or len(resized) != 2 or max(resized) != encoder.img_size:
            raise ValueError(
                f"Embedding sizes do not fit this model: original {original}, input {resized} "
                f"(expected (H, W) and the (h, w) resized to long side {encoder.img_size})."
            )
        self.reset_image()
        self.features = features.to(self.device, torch.float32)
        self.original_size, self.input_size = original, resized
        self.orig_h, self.orig_w = original
        self.input_h, self.input_w = resized
        self.is_image_set = True

    @property
    def image_embedding(self) -> ImageEmbedding:
        """The current image's embedding with its sizes (give it to :meth:`set_image_embedding` later).

        Raises:
            RuntimeError: no image set.
        """
        return ImageEmbedding(self.get_image_embedding(), tuple(self.original_size), tuple(self.input_size))

    def _prepare(
        self, image: np.ndarray, image_format: str, contrast_limits: Optional[Sequence[float]]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image as the encoder's 1x3xhxw input (long side resized to the model's size) and its (H, W)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
        rgb = to_rgb_uint8(image, contrast_limits)
        if image_format != self.model.image_format:
            rgb = rgb[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(rgb))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return tensor, (int(rgb.shape[0]), int(rgb.shape[1]))

    def _encoder_steps(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> Generator[tuple[int, int], None, ImageEmbedding]:
        """Run the image encoder on a resized image block by block (see :meth:`embedding_steps`)."""
        encoder = self.model.image_encoder
        side = encoder.img_size
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[0] != 1
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != side
        ):
            raise ValueError(
                f"set_torch_image expects a 1x3xhxw tensor with long side {side} "
                f"(apply predictor.transform.apply_image first); got shape {tuple(transformed_image.shape)}."
            )
        total = len(encoder.blocks) + 1  # preprocessing, then each block (the neck ends the last step)
        input_size = (int(transformed_image.shape[-2]), int(transformed_image.shape[-1]))
        with torch.no_grad():
            x = self.model.preprocess(transformed_image.to(self.device))
        yield 1, total
        with torch.no_grad(), self._autocast():
            x = encoder.patch_embed(x)
            if encoder.pos_embed is not None:
                x = x + encoder.pos_embed
        for index, block in enumerate(encoder.blocks):
            with torch.no_grad(), self._autocast():
                x = block(x)
            yield index + 2, total
        with torch.no_grad(), self._autocast():
            features = encoder.neck(x.permute(0, 3, 1, 2))
        original = tuple(int(v) for v in original_image_size)
        return ImageEmbedding(features.float(), original, input_size)

    def predict(
        self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True, return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts given in the original image frame.

        Args:
            point_coords: Nx2 (x, y) pixel coordinates in the original image frame, finite.
            point_labels: N labels: 1 positive point, 0 negative point (-1: padding, ignored);
                integers, booleans or floats holding those values.
            box: XYXY box (shape 4 or 1x4) in the original image frame, finite; corners given in
                another order (x1 < x0 or y1 < y0) are put in XYXY order.
            mask_input: 1xhxw low-res logits from a previous prediction (its third output);
                SAM's 1x256x256 is accepted by every model (see :meth:`predict_torch`).
            multimask_output: return 3 masks (for ambiguous prompts) instead of 1.
            return_logits: return float logits instead of boolean masks.

        Returns:
            masks CxHxW (bool, or float32 logits), predicted IoU C (float32) and low-res
            logits Cxhxw (float32; 256x256 for the official models, the model's own low-res
            size otherwise, e.g. 128x128 for ``vit_small``), C = 3 or 1, H x W the original size.

        Raises:
            RuntimeError: no image set.
            ValueError: no prompt at all, points without labels, labels other than 1/0/-1,
                NaN or infinite coordinates, or malformed shapes (the message says which).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords_t = labels_t = box_t = mask_t = None
        coords, labels, box_array = checked_prompts(
            point_coords, point_labels, box, "for several boxes use predict_torch with a Bx4 tensor"
        )
        if coords is not None and len(coords):
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int32, device=self.device)[None]
        if box_array is not None:
            box_array = self.transform.apply_boxes(box_array.reshape(1, 4), self.original_size)
            box_t = torch.as_tensor(box_array, dtype=torch.float32, device=self.device)
        if mask_input is not None:
            mask_array = np.asarray(mask_input)
            if mask_array.ndim != 3 or mask_array.shape[0] != 1:
                raise self._mask_shape_error(mask_array.shape)
            mask_t = torch.as_tensor(mask_array, dtype=torch.float32, device=self.device)[None]
        if coords_t is None and box_t is None and mask_t is None:
            raise ValueError("predict needs a prompt: point_coords with point_labels, a box, or a mask_input.")

        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output=multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    def _mask_shape_error(self, shape: Sequence[int]) -> ValueError:
        """The error for a mask prompt of a shape that is not accepted; names the accepted sizes."""
        sizes = {tuple(self.model.prompt_encoder.mask_input_size), SAM_LOW_RES_SIZE}
        text = " or ".join("x".join(map(str, size)) for size in sorted(sizes, reverse=True))
        return ValueError(
            f"mask_input must be low-res logits of {text} (1xhxw for predict, Bx1xhxw for predict_torch), "
            f"e.g. a previous prediction's third output; got shape {tuple(shape)}."
        )

    def _mask_prompt(self, mask_input: torch.Tensor) -> torch.Tensor:
        """Bx1xhxw low-res logits at the model's own low-res size (see :meth:`predict_torch`).

        Raises:
            ValueError: not Bx1xhxw with hxw the model's low-res size or SAM's 256x256.
        """
        own = tuple(self.model.prompt_encoder.mask_input_size)
        size = tuple(mask_input.shape[-2:])
        if mask_input.ndim != 4 or mask_input.shape[1] != 1 or size not in (own, SAM_LOW_RES_SIZE):
            raise self._mask_shape_error(mask_input.shape if mask_input.ndim != 4 else mask_input.shape[1:])
        if size == own:
            return mask_input
        # One rule: bilinear with half-pixel centres (as Sam.postprocess_masks resizes logits);
        # for 256 -> 128 each output logit is the mean of a 2x2 block.
        return F.interpolate(mask_input.float(), own, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict_torch(
        self, point_coords: Optional[torch.Tensor], point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None, mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True, return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for a batch of B prompts given in the resized (1024) frame.

        Args:
            point_coords: BxNx2 (x, y) in the resized frame (``transform.apply_coords_torch``), finite.
            point_labels: BxN: 1 positive point, 0 negative point, -1 padding (ignored).
            boxes: Bx4 XYXY in the resized frame (``transform.apply_boxes_torch``), finite;
                corners in another order are put in XYXY order.
            mask_input: Bx1xhxw low-res logits: the model's own low-res size (256x256 for the
                official models), or SAM's 256x256 for a model whose size differs (``vit_small``:
                128x128), resized to the model's size with bilinear interpolation (half-pixel
                centres: from 256x256 to 128x128, the mean of each 2x2 block).
            multimask_output: 3 masks per prompt instead of 1.
            return_logits: float logits instead of boolean masks.

        Returns:
            masks BxCxHxW (bool or float32 logits, original size), predicted IoU BxC and
            low-res logits BxCxhxw (float32, the model's own low-res size), C = 3 or 1.

        Raises:
            RuntimeError: no image set.
            ValueError: labels other than 1/0/-1, NaN or infinite coordinates, or malformed
                shapes (the message says which).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is not None:
            if point_labels is None or tuple(point_labels.shape) != tuple(point_coords.shape[:-1]):
                raise ValueError(
                    "point_coords must be BxNx2 (x, y) with point_labels BxN; got "
                    f"{tuple(point_coords.shape)} and {None if point_labels is None else tuple(point_labels.shape)}."
                )
            _check_finite("point_coords", point_coords, "BxNx2 (x, y)")
            if not bool(torch.isin(point_labels, torch.tensor(POINT_LABELS, device=point_labels.device)).all()):
                raise ValueError("point_labels must be 1 (positive point), 0 (negative point) or -1 (padding).")
        if boxes is not None:
            if boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be Bx4 XYXY, got shape {tuple(boxes.shape)}.")
            _check_finite("boxes", boxes, "Bx4 XYXY")
            boxes = _ordered_boxes(boxes)
        if mask_input is not None:
            mask_input = self._mask_prompt(mask_input)
        points = (point_coords, point_labels) if point_coords is not None else None
        batch = next((t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None), 1)
        # Reduced precision pays off in the decoder only for larger prompt batches; for a
        # few prompts the casts cost more than they save, so small batches run in float32.
        precision = self.precision if batch >= DECODER_REDUCED_PRECISION_MIN_BATCH else "fp32"
        with autocast_context(self.device, precision):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            if mask_input is None:
                low_res, iou = self._decode_without_mask(sparse, multimask_output)
            else:
                low_res, iou = self.model.mask_decoder(
                    image_embeddings=self.features,
                    image_pe=self.model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                )
        low_res, iou = low_res.float(), iou.float()
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _decode_without_mask(
        self, sparse: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder for prompts without a mask prompt, sharing per-image work.

        The decoder's prompt-independent first-block projections are computed once per image
        (:class:`~napari_sam.modeling.prompt_batch_decoder.PromptBatchDecoder`) and reused by
        every later ``predict``; equal to ``model.mask_decoder`` up to float rounding.

        Returns:
            low-res logits BxMx256x256 and predicted IoU BxM (M = 3 or 1).
        """
        decoder = self.prompt_batch_decoder()
        iou, mask_tokens, image_tokens = decoder.run(sparse, multimask_output)
        batch, outputs = iou.shape
        device = iou.device
        prompt_index = torch.arange(batch, device=device).repeat_interleave(outputs)
        output_index = torch.arange(outputs, device=device).repeat(batch)
        logits = decoder.masks(mask_tokens, image_tokens, prompt_index, output_index, multimask_output)
        return logits.view(batch, outputs, *logits.shape[-2:]), iou

    @torch.no_grad()
    def prompt_batch_decoder(self) -> "PromptBatchDecoder":
        """The mask decoder's prompt-independent work on the current image embedding, done once.

        Returns the :class:`~napari_sam.modeling.prompt_batch_decoder.PromptBatchDecoder` that
        decodes batches of prompts without a mask prompt on this image (used by ``predict``
        and by the automatic mask generator); computed in float32 on first use and kept
        until the image changes.

        Raises:
            RuntimeError: no image set.
        """
        from .modeling.prompt_batch_decoder import PromptBatchDecoder, dense_no_mask_embedding

        features = self.get_image_embedding()
        # Keyed on the features tensor itself and its in-place version counter, not on who set
        # it: clients of the reference assign ``predictor.features`` directly (precomputed
        # embeddings, tiles), and a decoder of the previous image must never be reused.
        key = (features, features._version)
        cached = self._batch_decoder
        if cached is None or cached[0] is not key[0] or cached[1] != key[1]:
            encoder = self.model.prompt_encoder
            with torch.autocast(device_type=self.device.type, enabled=False):
                decoder = PromptBatchDecoder(
                    self.model.mask_decoder, features, encoder.get_dense_pe(), dense_no_mask_embedding(encoder)
                )
            self._batch_decoder = cached = (*key, decoder)
        return cached[2]

    def get_image_embedding(self) -> torch.Tensor:
        """The 1x256x64x64 image embedding of the current image.

        Raises:
            RuntimeError: no image set.
        """
        if not self.is_image_set or self.features is None:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        # (features, their version, PromptBatchDecoder): per-image decoder work, built on the
        # first predict for the features it was built from (see prompt_batch_decoder)
        self._batch_decoder: Optional[tuple] = None
        self.original_size: Optional[tuple[int, ...]] = None
        self.input_size: Optional[tuple[int, ...]] = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
