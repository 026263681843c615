"""``SamOnnxModel``: the prompt encoder, mask decoder and mask upscaling as one traceable module.

The reference's ``segment_anything.utils.onnx.SamOnnxModel``, with its constructor, inputs,
outputs and formulas (its export script's input names are the forward's parameter names). It
runs on a precomputed image embedding, so a browser or a service can answer prompts with
ONNX Runtime while the image encoder runs elsewhere (``SamPredictor.get_image_embedding``).
Prompts are written without Python control flow that depends on the prompt, so one exported
graph serves any number of points, with or without a mask prompt:

* points are (x, y) in the resized frame (``ResizeLongestSide.apply_coords``); labels are
  float: 1 positive, 0 negative, 2 and 3 the top-left and bottom-right corners of a box,
  -1 a padding point (add one when there is no box, as ``PromptEncoder`` does);
* ``mask_input`` (1x1x256x256 logits) counts only when ``has_mask_input`` is 1.

:func:`export_onnx` writes the ONNX file; it needs the ``onnx`` extra (``pip install
'napari-sam[onnx]'``: onnx, onnxscript, onnxruntime). The module itself needs only torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Sam
from .amg import calculate_stability_score

__all__ = ["SamOnnxModel", "Sam", "calculate_stability_score", "export_onnx", "import_onnx_extra"]

#: Inputs and outputs of the exported graph (the reference export script's names).
ONNX_INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
ONNX_OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")

# select_masks: added to the single-mask token's score per point beyond 2.5 (the reference's
# 1000): with 3+ points (2 clicks and the padding point, or a box) the single mask wins,
# otherwise the best of the multimask outputs.
_SINGLE_MASK_WEIGHT = 1000.0


class SamOnnxModel(nn.Module):
    """Prompt encoder + mask decoder + upscaling of a SAM, for tracing and ONNX export.

    Not meant for direct use (``SamPredictor`` is faster and takes the same prompts); its
    forward is written so that tracing records one graph for every prompt.

    Args:
        model: the SAM whose prompt encoder and mask decoder are used (not copied).
        return_single_mask: return one mask per prompt, chosen by :meth:`select_masks`;
            otherwise all four mask tokens' outputs (the single mask first).
        use_stability_score: report the stability score of the low-res logits
            (:func:`~napari_sam.utils.amg.calculate_stability_score`, offset 1.0) instead of
            the predicted IoU.
        return_extra_metrics: also return the stability score and area of the upscaled masks.

    Attributes:
        model, mask_decoder: the wrapped model and its decoder.
        img_size: side of the model's square input (1024).
        stability_score_offset: threshold shift of the stability score (1.0).
    """

    def __init__(
        self, model: Sam, return_single_mask: bool, use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.mask_decoder = model, model.mask_decoder
        self.img_size = model.image_encoder.img_size
        # What the exported graph returns (see forward): one mask or all, which score, extras.
        self.return_single_mask, self.return_extra_metrics = return_single_mask, return_extra_metrics
        self.use_stability_score, self.stability_score_offset = use_stability_score, 1.0

    @staticmethod
    def resize_longest_image_size(input_image_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """(h, w) of an image of size ``input_image_size`` resized so its long side is ``longest_side``.

        The tensor form of ``ResizeLongestSide.get_preprocess_shape``: each side times
        ``longest_side / max(h, w)``, rounded half up.

        Args:
            input_image_size: 2-element (H, W) tensor, any numeric dtype.
            longest_side: target length of the long side.

        Returns:
            2-element int64 tensor (h, w).
        """
        size = input_image_size.to(torch.float32)
        scaled = size * (longest_side / size.max())
        return torch.floor(scaled + 0.5).to(torch.int64)

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """BxNx2 (x, y) points in the resized frame and BxN labels -> BxNxD sparse embeddings.

        Positional encoding of the pixel centre, replaced by ``not_a_point_embed`` for label
        -1, plus ``point_embeddings[label]`` for labels 0-3 (negative, positive, box corners).
        """
        encoder = self.model.prompt_encoder
        side = (self.img_size, self.img_size)
        encoding = encoder.pe_layer.forward_with_coords(point_coords + 0.5, side)
        labels = point_labels.unsqueeze(-1)
        embedding = torch.where(labels == -1, encoder.not_a_point_embed.weight, encoding)
        for label, table in enumerate(encoder.point_embeddings):
            embedding = embedding + table.weight * (labels == label)
        return embedding

    def _embed_masks(self, input_mask: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Dense embedding: the downscaled mask prompt where ``has_mask_input`` is 1, else
        ``no_mask_embed`` (a blend of the two, so the graph has no branch)."""
        encoder = self.model.prompt_encoder
        from_mask = encoder.mask_downscaling(input_mask)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * from_mask + (1 - has_mask_input) * no_mask

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits -> logits at the original image size.

        As ``Sam.postprocess_masks``: bilinear (align_corners=False) to img_size x img_size,
        crop to the resized image (:meth:`resize_longest_image_size`), bilinear to (H, W).

        Args:
            masks: BxCx256x256 logits.
            orig_im_size: 2-element (H, W) tensor (float in the exported graph).

        Returns:
            BxCxHxW logits.
        """
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        resized = self.resize_longest_image_size(orig_im_size, self.img_size)
        # Slicing with 0-d tensors (not Python ints): tracing records the crop as part of the
        # graph, so the exported model crops right for every orig_im_size.
        masks = masks[..., : resized[0], : resized[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def select_masks(
        self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt without branching on the number of points.

        The single-mask token (index 0) gets ``(num_points - 2.5) * 1000`` added to its
        score: with 3 or more points it wins, with fewer it loses to the multimask outputs,
        of which the one with the highest predicted IoU is taken.

        Args:
            masks: BxTxhxw logits of all T mask tokens.
            iou_preds: BxT scores.
            num_points: N of the BxNx2 points, padding point included.

        Returns:
            (Bx1xhxw logits, Bx1 scores) of the chosen token.
        """
        tokens = self.model.mask_decoder.num_mask_tokens
        single_first = torch.tensor([[_SINGLE_MASK_WEIGHT] + [0.0] * (tokens - 1)], device=iou_preds.device)
        best = torch.argmax(iou_preds + (num_points - 2.5) * single_first, dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), iou_preds[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(  # the parameter names are the exported graph's input names (ONNX_INPUT_NAMES)
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
        mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Masks for prompts on one precomputed image embedding.

        Args:
            image_embeddings: 1x256x64x64 float32 (``SamPredictor.get_image_embedding()``).
            point_coords: BxNx2 float32 (x, y) in the resized (1024) frame.
            point_labels: BxN float32 labels (see the module docstring).
            mask_input: 1x1x256x256 float32 low-res logits of an earlier prediction.
            has_mask_input: 1-element float32, 1 to use ``mask_input``, 0 to ignore it.
            orig_im_size: 2-element float32 (H, W) of the original image.

        Returns:
            ``(masks, scores, low_res_masks)``: BxCxHxW logits at the original size, BxC
            scores (predicted IoU, or stability with ``use_stability_score``) and BxCx256x256
            logits, C = 1 with ``return_single_mask``, else 4 (the single-mask token first).
            With ``return_extra_metrics``: ``(masks, scores, stability_scores, areas,
            low_res_masks)``, where stability and area (int64 pixel count above the
            threshold) are of the upscaled masks.
        """
        prompts = (self._embed_points(point_coords, point_labels), self._embed_masks(mask_input, has_mask_input))
        # All mask tokens, unselected (MaskDecoder.predict_masks: embedding, positional encoding, prompts).
        low_res, scores = self.model.mask_decoder.predict_masks(
            image_embeddings, self.model.prompt_encoder.get_dense_pe(), *prompts
        )
        threshold = self.model.mask_threshold
        if self.use_stability_score:
            scores = calculate_stability_score(low_res, threshold, self.stability_score_offset)
        if self.return_single_mask:
            low_res, scores = self.select_masks(low_res, scores, point_coords.shape[1])
        masks = self.mask_postprocessing(low_res, orig_im_size)
        if not self.return_extra_metrics:
            return masks, scores, low_res
        stability = calculate_stability_score(masks, threshold, self.stability_score_offset)
        areas = (masks > threshold).sum(dim=(-2, -1))
        return masks, scores, stability, areas, low_res


def import_onnx_extra(name: str) -> Any:
    """Import ``onnx``, ``onnxscript`` or ``onnxruntime``, naming the extra that provides them.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"{name} is needed for ONNX export and inference; install napari-sam's onnx extra: "
            "pip install 'napari-sam[onnx]'"
        ) from error


def example_inputs(sam: Sam, num_points: int = 5, orig_im_size: tuple[int, int] = (1500, 2250)) -> dict[str, torch.Tensor]:
    """Random inputs of :meth:`SamOnnxModel.forward`, by name (for tracing and tests).

    Args:
        sam: the model (its embedding size and input side).
        num_points: N of the 1xNx2 points.
        orig_im_size: (H, W) of the pretend original image.
    """
    encoder = sam.prompt_encoder
    grid_h, grid_w = encoder.image_embedding_size
    side = sam.image_encoder.img_size
    return {
        "image_embeddings": torch.randn(1, encoder.embed_dim, grid_h, grid_w),
        "point_coords": torch.randint(0, side, (1, num_points, 2)).to(torch.float32),
        "point_labels": torch.randint(-1, 4, (1, num_points)).to(torch.float32),
        "mask_input": torch.randn(1, 1, *encoder.mask_input_size),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor(orig_im_size, dtype=torch.float32),
    }


def export_onnx(
    sam: Sam,
    path: Union[str, "os.PathLike[str]"],
    return_single_mask: bool = True,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    opset: int = 17,
    orig_im_size: Optional[tuple[int, int]] = None,
) -> None:
    """Write :class:`SamOnnxModel` of ``sam`` to an ONNX file (the reference's export script's graph).

    Exported with the TorchScript-based exporter of ``torch.onnx.export`` (``dynamo=False``,
    which records ``orig_im_size`` and the number of points as graph inputs); the number of
    points is a dynamic axis. The inputs and outputs are named as in :data:`ONNX_INPUT_NAMES`
    and :data:`ONNX_OUTPUT_NAMES` (with extra metrics: masks, iou_predictions,
    stability_scores, areas, low_res_masks).

    Args:
        sam: the model, on the CPU.
        path: the .onnx file to write.
        return_single_mask, use_stability_score, return_extra_metrics: see :class:`SamOnnxModel`.
        opset: ONNX opset version.
        orig_im_size: (H, W) of the example image used for tracing (any size works afterwards).

    Raises:
        ImportError: onnx is not installed (the ``napari-sam[onnx]`` extra).
    """
    import_onnx_extra("onnx")
    wrapper = SamOnnxModel(sam, return_single_mask, use_stability_score, return_extra_metrics).eval()
    inputs = example_inputs(sam, orig_im_size=orig_im_size or (1500, 2250))
    outputs = list(ONNX_OUTPUT_NAMES)
    if return_extra_metrics:
        outputs[2:2] = ["stability_scores", "areas"]
    torch.onnx.export(
        wrapper,
        tuple(inputs.values()),
        os.fspath(path),
        input_names=list(ONNX_INPUT_NAMES),
        output_names=outputs,
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
