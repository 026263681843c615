"""Prompt encoder: points, boxes and mask prompts to sparse and dense embeddings."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .common import LayerNorm2d

# Point labels understood by the prompt encoder (reference behaviour): 1 positive point,
# 0 negative point, -1 padding ("not a point"). Box corners get embeddings 2 and 3.
LABEL_PADDING = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1


class PromptEncoder(nn.Module):
    """Encode prompts for the mask decoder.

    Args:
        embed_dim: prompt embedding width (256).
        image_embedding_size: (H, W) of the image embedding grid (64, 64).
        input_image_size: (H, W) of the padded model input (1024, 1024); point and box
            coordinates are (x, y) pixels in this frame.
        mask_in_chans: hidden channels of the mask-prompt downscaler.
        activation: activation of the mask-prompt downscaler.
    """

    def __init__(
        self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
        mask_in_chans: int, activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        # 256x256 mask logits -> 64x64 embedding: two 2x2/stride-2 convs, then 1x1 to D.
        hidden = mask_in_chans // 4
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, hidden), (hidden, mask_in_chans)):
            layers += [nn.Conv2d(c_in, c_out, 2, stride=2), LayerNorm2d(c_out), activation()]
        layers.append(nn.Conv2d(mask_in_chans, embed_dim, 1))
        self.mask_downscaling = nn.Sequential(*layers)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, 1x(embed_dim)xHxW."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """BxNx2 (x, y) points in the input frame and BxN labels -> BxNxD (BxN+1xD if pad)."""
        points = points.to(torch.float32) + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PADDING)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        is_padding = (labels == LABEL_PADDING).unsqueeze(-1)
        embedding = torch.where(is_padding, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == LABEL_NEGATIVE).unsqueeze(-1) * self.point_embeddings[0].weight
        embedding = embedding + (labels == LABEL_POSITIVE).unsqueeze(-1) * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Bx4 XYXY boxes in the input frame -> Bx2xD corner embeddings."""
        corners = (boxes.to(torch.float32) + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_kind = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return embedding + corner_kind

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Bx1x4Hx4W mask logits -> BxDxHxW dense embedding."""
        return self.mask_downscaling(masks)

    @staticmethod
    def _get_batch_size(
        points: Optional[tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _get_device(self) -> torch.device:
        return self.point_embeddings[0].weight.device

    def forward(
        self, points: Optional[tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: (BxNx2 (x, y) coordinates in the input frame, BxN labels: 1 positive,
                0 negative, -1 padding) or None. Without boxes, one padding point is
                appended, as in the reference.
            boxes: Bx4 XYXY boxes in the input frame, or None.
            masks: Bx1x256x256 mask logits (low-res logits of a previous prediction), or None.

        Returns:
            sparse embeddings BxNxD and dense embeddings BxDxHxW. Without a mask prompt the
            dense embeddings are ``no_mask_embed`` expanded (a stride-0 view over B).
        """
        batch = self._get_batch_size(points, boxes, masks)
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=1)
        else:
            sparse = torch.empty((batch, 0, self.embed_dim), device=self._get_device())
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                batch, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier-feature positional encoding (Tancik et al. 2020), as in SAM.

    Coordinates normalised to [0, 1] are mapped to [-1, 1], projected by a fixed Gaussian
    matrix G (2 x F, a checkpoint buffer), scaled by 2*pi, and encoded as [sin, cos]
    (sin first), giving 2F features.
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """...x2 coordinates in [0, 1] -> ...x2F features."""
        projected = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * projected
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an HxW grid of cells, (2F)xHxW."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        grid = torch.stack(
            [xs.unsqueeze(0).expand(height, width), ys.unsqueeze(1).expand(height, width)], dim=-1
        )
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode BxNx2 (x, y) pixel coordinates of an image of size (H, W) -> BxNx2F.

        Works in float32 throughout: float64 never reaches the model (MPS has no float64).
        """
        size = torch.tensor([image_size[1], image_size[0]], dtype=torch.float32, device=coords_input.device)
        return self._pe_encoding(coords_input.to(torch.float32) / size)
