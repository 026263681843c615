"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """Segment Anything (Kirillov et al. 2023).

    Args:
        image_encoder: backbone producing the image embedding.
        prompt_encoder: encoder of points, boxes and mask prompts.
        mask_decoder: predicts mask logits and IoU from the two.
        pixel_mean: per-channel mean in 0-255 units used to normalise RGB input.
        pixel_std: per-channel standard deviation in 0-255 units.

    Attributes:
        mask_threshold: logits above this value (strictly) are foreground (0.0).
        image_format: channel order the model expects ("RGB").
    """

    image_format: str = "RGB"
    mask_threshold: float = 0.0

    def __init__(
        self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not part of the checkpoint (non-persistent), as in the reference.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """Predict masks end to end for a batch of images, each with its own prompts.

        Args:
            batched_input: one dict per image with
                ``image``: 3xHxW tensor already resized by ``ResizeLongestSide`` (long side
                1024), in 0-255 units, not normalised or padded;
                ``original_size``: (H, W) of the image before resizing;
                optional ``point_coords`` BxNx2 (x, y) and ``point_labels`` BxN (1
                positive, 0 negative), ``boxes`` Bx4 XYXY, ``mask_inputs`` Bx1x256x256
                logits; coordinates in the resized (1024) frame.
            multimask_output: predict 3 masks per prompt instead of 1.

        Returns:
            one dict per image: ``masks`` BxCxHxW bool at the original size, ``iou_predictions``
            BxC, ``low_res_logits`` BxCx256x256 (C = 3 or 1).
        """
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = None
            if record.get("point_coords") is not None:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res, input_size=tuple(record["image"].shape[-2:]), original_size=record["original_size"]
            )
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res}
            )
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Upscale low-res logits to the original image frame.

        Two bilinear steps (align_corners=False, no antialiasing), as in the reference:
        to the padded input size (1024x1024), crop away the padding, then to the original
        size. Fusing them into one resize gives different values. Only the part of the
        first resize that survives the crop is computed (bit-identical to the reference).

        Args:
            masks: BxCx256x256 logits.
            input_size: (h, w) of the resized image before padding.
            original_size: (H, W) of the original image.

        Returns:
            BxCxHxW logits.
        """
        side = self.image_encoder.img_size
        low_h, low_w = masks.shape[-2:]
        if side % low_h == 0 and side % low_w == 0 and low_h == low_w:
            # Only the low-res rows/columns that reach the unpadded area are upscaled. With
            # an integer factor the source-coordinate arithmetic is the same as for the
            # full resize (scale 1/factor either way), so the values are identical; one
            # extra row/column keeps the bilinear neighbour of the last needed pixel.
            factor = side // low_h
            rows = min(low_h, -(-input_size[0] // factor) + 1)
            cols = min(low_w, -(-input_size[1] // factor) + 1)
            masks = F.interpolate(
                masks[..., :rows, :cols], scale_factor=float(factor), mode="bilinear", align_corners=False
            )
        else:
            masks = F.interpolate(masks, (side, side), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a 3xHxW (or Bx3xHxW) 0-255 image and zero-pad it bottom/right to img_size."""
        x = (x - self.pixel_mean) / self.pixel_std
        side = self.image_encoder.img_size
        return F.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]))
