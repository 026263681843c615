"""Mask decoder: prompt tokens + image embedding -> mask logits and predicted IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predict masks from an image embedding and prompt embeddings.

    Args:
        transformer_dim: token width (256).
        transformer: the two-way transformer.
        num_multimask_outputs: masks predicted for ambiguous prompts (3); one more mask
            token serves the single-mask output.
        activation: activation of the upscaling branch.
        iou_head_depth: layers of the IoU prediction MLP.
        iou_head_hidden_dim: hidden width of the IoU prediction MLP.
    """

    def __init__(
        self, *, transformer_dim: int, transformer: nn.Module, num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        dim = transformer_dim
        tokens = num_multimask_outputs + 1  # one more token for the single-mask output
        self.transformer_dim, self.transformer = dim, transformer
        self.num_multimask_outputs, self.num_mask_tokens = num_multimask_outputs, tokens
        self.iou_token, self.mask_tokens = nn.Embedding(1, dim), nn.Embedding(tokens, dim)
        # 64x64xD -> 256x256x(D/8): two 2x2/stride-2 transposed convolutions.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), activation(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(tokens)])
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, tokens, iou_head_depth)

    def forward(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for a batch of prompts on one image.

        Args:
            image_embeddings: 1xCxHxW embedding of one image (C=256, H=W=64).
            image_pe: 1xCxHxW positional encoding (``PromptEncoder.get_dense_pe``).
            sparse_prompt_embeddings: BxNxC point and box embeddings.
            dense_prompt_embeddings: BxCxHxW mask-prompt embeddings.
            multimask_output: return the 3 multimask outputs instead of the single mask.

        Returns:
            low-res mask logits Bx(3 or 1)x4Hx4W and predicted IoU Bx(3 or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]

    def predict_masks(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens' outputs: logits Bx4x4Hx4W and predicted IoU Bx4 (see ``forward``)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )
        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            dense = dense[:1]  # the same "no mask" embedding for every prompt: add it once
        src = image_embeddings + dense
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        _, channels, height, width = image_embeddings.shape
        grid = src.transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = self.output_upscaling(grid.contiguous(memory_format=torch.channels_last))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = torch.bmm(hyper_in, upscaled.reshape(b, c, h * w)).view(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
