"""Two-way transformer of the SAM mask decoder.

Prompt tokens (queries) and image-embedding tokens (keys) attend to each other in both
directions. The image side may be given once (batch 1) for a batch of B prompts: the
attention and projections broadcast, so prompt-independent work (the key/value
projections of the image tokens in the first block) is done once per image instead of
once per prompt. The reference copies the image embedding B times first; the results are
the same up to floating-point rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` followed by a final token-to-image attention.

    Args:
        depth: number of blocks (2 in SAM).
        embedding_dim: token width (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the token MLP (2048).
        activation: MLP activation (ReLU).
        attention_downsample_rate: cross-attention works in embedding_dim / rate channels.
    """

    def __init__(
        self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, skip_first_layer_pe=i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Args:
            image_embedding: BxCxHxW (or 1xCxHxW, shared by all B prompts).
            image_pe: 1xCxHxW positional encoding of the image grid.
            point_embedding: BxNxC prompt tokens.

        Returns:
            (BxNxC processed prompt tokens, BxHWxC processed image tokens).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        if keys.shape[0] != queries.shape[0]:  # depth 0: image side never became per-prompt
            keys = keys.expand(queries.shape[0], -1, -1)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of the tokens, then token->image and image->token cross-attention.

    Each step is residual and followed by a LayerNorm (post-norm), except the first
    block's self-attention, which gets no positional encoding and whose output replaces
    the tokens (no residual), as in the reference.
    """

    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        dim = embedding_dim

        def cross() -> Attention:
            return Attention(dim, num_heads, downsample_rate=attention_downsample_rate)

        # Registration order = the checkpoint's key order.
        self.self_attn, self.norm1 = Attention(dim, num_heads), nn.LayerNorm(dim)
        self.cross_attn_token_to_image, self.norm2 = cross(), nn.LayerNorm(dim)
        self.mlp, self.norm3 = MLPBlock(dim, mlp_dim, activation), nn.LayerNorm(dim)
        self.norm4, self.cross_attn_image_to_token = nn.LayerNorm(dim), cross()
        self.skip_first_layer_pe = skip_first_layer_pe

    def token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """Self-attention of the prompt tokens and norm1 (BxNxC -> BxNxC).

        The first block adds no positional encoding and replaces the tokens (no residual).
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            with_pe = queries + query_pe
            queries = queries + self.self_attn(q=with_pe, k=with_pe, v=queries)
        return self.norm1(queries)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries BxNxC, keys (B or 1)xHWxC, query_pe BxNxC, key_pe 1xHWxC."""
        queries = self.token_self_attention(queries, query_pe)

        keys_with_pe = keys + key_pe
        queries = self.norm2(
            queries + self.cross_attn_token_to_image(q=queries + query_pe, k=keys_with_pe, v=keys)
        )
        queries = self.norm3(queries + self.mlp(queries))

        attn_out = self.cross_attn_image_to_token(q=keys_with_pe, k=queries + query_pe, v=queries)
        keys = self.norm4(keys + attn_out)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention with an optional reduced internal width.

    q, k and v are projected to embedding_dim / downsample_rate channels, split into
    heads, combined with softmax(q k^T / sqrt(d_head)) and projected back. Batch sizes
    of 1 broadcast against B (an image shared by several prompts).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide embedding_dim / downsample_rate ({self.internal_dim})."
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    @staticmethod
    def _recombine_heads(x: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: BqxNqxC, k and v: BkxNkxC (Bq and Bk equal, or one of them 1) -> BxNqxC."""
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = torch.matmul(torch.softmax(logits, dim=-1), v)
        return self.out_proj(self._recombine_heads(out))
