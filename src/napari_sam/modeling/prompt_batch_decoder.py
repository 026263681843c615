"""Fast mask decoding of many prompt batches on one image embedding (automatic mask generation).

:class:`PromptBatchDecoder` computes what :class:`~napari_sam.modeling.MaskDecoder` computes
for a batch of prompts without a mask prompt, with the same weights, in a cheaper order of
operations. It is mathematically equal to the reference's decoder; only the floating-point
rounding differs (relative ~1e-6 in float32). The savings, in the order of the data flow:

1. **Prompt-independent work once per image.** Without a mask prompt, the image tokens
   entering the first two-way block, their positional-encoding sum, and the first block's
   image-side projections (keys and values of the token->image attention, queries of the
   image->token attention) are the same for every prompt. They are computed once per image
   and reused by every batch (the reference repeats the embedding B times and projects it B
   times per batch).
2. **Attention through the few tokens.** In later blocks the image side is per prompt
   (4096 tokens x 256 channels) but the prompt side has only a handful of tokens. Instead
   of projecting 4096 image tokens to keys/values (or queries), the few token-side vectors
   are projected back through the weight matrices:

   * token->image: ``softmax(Q (W_k x + b_k)^T / sqrt(d)) (W_v x + b_v)`` equals
     ``W_v (softmax((Q W_k / sqrt(d)) x^T) x) + b_v``: the key bias is constant along the
     softmax axis and cancels; attention rows sum to 1, so the value projection moves
     outside. Two products with 8*N rows instead of two projections of 4096 rows.
   * image->token: ``(W_q x + b_q) K^T`` equals ``x (W_q^T K^T) + b_q K^T``, and the output
     projection folds into the values (``A V W_o^T = A (V W_o^T)``; the output bias is
     spread over the heads, whose attention rows each sum to 1).
3. **Only the outputs that are used.** The final token->image attention runs for the
   IoU token and the mask tokens of the requested output only; the upscaling branch and the
   hypernetwork product run later, and only for the (prompt, mask) pairs that a caller
   keeps (e.g. after the predicted-IoU filter), with channels_last convolutions.

Formulas: SAM's two-way transformer (Kirillov et al. 2023, Sec. 3 and appendix A; the
reference's ``modeling/transformer.py`` and ``mask_decoder.py``).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .mask_decoder import MaskDecoder
from .transformer import Attention, TwoWayAttentionBlock


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """BxNx(H*d) -> BxHxNxd (a view where possible)."""
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, num_heads, channels // num_heads).transpose(1, 2)


def _token_to_image(attn: Attention, queries: torch.Tensor, keys_pe: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``attn(q=queries, k=keys_pe, v=keys)`` for few queries and many keys, factored.

    Args:
        attn: the attention module (its weights are used, not its forward).
        queries: BxNxC token-side inputs (N small).
        keys_pe: BxLxC image tokens plus positional encoding (L = 4096).
        keys: BxLxC image tokens.

    Returns:
        BxNxC, equal to the module's output up to rounding.
    """
    heads = attn.num_heads
    internal = attn.internal_dim
    head_dim = internal // heads
    channels = keys.shape[-1]
    batch, n_tokens, _ = queries.shape
    q = _heads(attn.q_proj(queries), heads)  # B x H x N x d
    w_k = attn.k_proj.weight.view(heads, head_dim, channels)
    q_back = torch.matmul(q, w_k) * (1.0 / math.sqrt(head_dim))  # B x H x N x C
    logits = torch.bmm(q_back.reshape(batch, heads * n_tokens, channels), keys_pe.transpose(1, 2))
    weights = torch.softmax(logits, dim=-1)  # B x (H*N) x L
    pooled = torch.bmm(weights.to(keys.dtype), keys).view(batch, heads, n_tokens, channels)
    w_v = attn.v_proj.weight.view(heads, head_dim, channels)
    values = torch.matmul(pooled, w_v.transpose(1, 2)) + attn.v_proj.bias.view(heads, 1, head_dim)
    return attn.out_proj(values.transpose(1, 2).reshape(batch, n_tokens, internal))


class PromptBatchDecoder:
    """Decode batches of point prompts on one image embedding, sharing per-image work.

    Args:
        decoder: the model's mask decoder (weights are read, not copied).
        image_embedding: 1xCxhxw image embedding (C=256, h=w=64), float32.
        image_pe: 1xCxhxw dense positional encoding (``PromptEncoder.get_dense_pe()``).
        dense_embedding: 1xCxhxw "no mask" dense prompt embedding (``no_mask_embed``
            broadcast), added to the image embedding once.

    The transformer must have at least one block. All methods run under the caller's
    ``torch.no_grad()`` / autocast context.
    """

    def __init__(
        self,
        decoder: MaskDecoder,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        dense_embedding: torch.Tensor,
    ) -> None:
        if image_embedding.ndim != 4 or image_embedding.shape[0] != 1:
            raise ValueError(f"image_embedding must be 1xCxHxW, got {tuple(image_embedding.shape)}.")
        transformer = decoder.transformer
        if len(transformer.layers) == 0:
            raise ValueError("PromptBatchDecoder needs a transformer with at least one block.")
        self.decoder = decoder
        self.grid_size = tuple(image_embedding.shape[-2:])
        src = image_embedding + dense_embedding[:1]
        self.keys0 = src.flatten(2).transpose(1, 2).contiguous()  # 1 x L x C
        self.key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()  # 1 x L x C
        keys0_pe = self.keys0 + self.key_pe
        first: TwoWayAttentionBlock = transformer.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        # Prompt-independent projections of the first block (one image, shared by all prompts).
        # Head-major (H x L x d), so that a batch of prompts is one product per head.
        self.k0 = _heads(t2i.k_proj(keys0_pe), t2i.num_heads)[0].contiguous()
        self.v0 = _heads(t2i.v_proj(self.keys0), t2i.num_heads)[0].contiguous()
        self.q0 = _heads(i2t.q_proj(keys0_pe), i2t.num_heads)[0].contiguous()

    # -- transformer ---------------------------------------------------------------------

    def _first_block(self, block: TwoWayAttentionBlock, queries: torch.Tensor, query_pe: torch.Tensor):
        """First block with the shared (batch-1) image side; returns (queries, keys BxLxC)."""
        queries = block.token_self_attention(queries, query_pe)

        t2i = block.cross_attn_token_to_image
        batch, n_tokens, _ = queries.shape
        heads = t2i.num_heads
        q = _heads(t2i.q_proj(queries + query_pe), heads)  # B x H x N x d
        q = q.transpose(0, 1).reshape(heads, batch * n_tokens, -1)  # H x BN x d
        logits = torch.bmm(q, self.k0.transpose(1, 2).to(q.dtype)) / math.sqrt(q.shape[-1])  # H x BN x L
        out = torch.bmm(torch.softmax(logits, dim=-1).to(q.dtype), self.v0.to(q.dtype))  # H x BN x d
        out = out.view(heads, batch, n_tokens, -1).permute(1, 2, 0, 3).reshape(batch, n_tokens, -1)
        queries = block.norm2(queries + t2i.out_proj(out))
        queries = block.norm3(queries + block.mlp(queries))

        i2t = block.cross_attn_image_to_token
        heads = i2t.num_heads
        k = _heads(i2t.k_proj(queries + query_pe), heads)  # B x H x N x d
        k = k.transpose(0, 1).reshape(heads, batch * n_tokens, -1)  # H x BN x d
        logits = torch.bmm(k, self.q0.transpose(1, 2).to(k.dtype)) / math.sqrt(k.shape[-1])  # H x BN x L
        length = logits.shape[-1]
        # Softmax over the N tokens (dim 2 of H x B x N x L: fast, L is contiguous).
        weights = torch.softmax(logits.view(heads, batch, n_tokens, length), dim=2)
        weights = weights.transpose(0, 1).reshape(batch, heads * n_tokens, length)
        keys = self._add_image_to_token(i2t, self.keys0, weights, queries)
        return queries, block.norm4(keys)

    @staticmethod
    def _add_image_to_token(
        attn: Attention, keys: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """``keys + out_proj(attention output)`` given attention weights Bx(H*N)xL."""
        heads = attn.num_heads
        head_dim = attn.internal_dim // heads
        channels = attn.embedding_dim
        batch, n_tokens, _ = tokens.shape
        v = _heads(attn.v_proj(tokens), heads)  # B x H x N x d
        w_o = attn.out_proj.weight.view(channels, heads, head_dim).permute(1, 2, 0)  # H x d x C
        projected = torch.matmul(v, w_o) + attn.out_proj.bias / heads  # B x H x N x C
        projected = projected.reshape(batch, heads * n_tokens, channels)
        return torch.baddbmm(keys.to(projected.dtype), weights.transpose(1, 2).to(projected.dtype), projected)

    def _later_block(
        self, block: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor
    ):
        """A block whose image side is per prompt (BxLxC); returns (queries, keys)."""
        queries = block.token_self_attention(queries, query_pe)

        keys_pe = keys + self.key_pe
        out = _token_to_image(block.cross_attn_token_to_image, queries + query_pe, keys_pe, keys)
        queries = block.norm2(queries + out)
        queries = block.norm3(queries + block.mlp(queries))

        i2t = block.cross_attn_image_to_token
        heads = i2t.num_heads
        head_dim = i2t.internal_dim // heads
        channels = i2t.embedding_dim
        batch, n_tokens, _ = queries.shape
        k = _heads(i2t.k_proj(queries + query_pe), heads)  # B x H x N x d
        w_q = i2t.q_proj.weight.view(heads, head_dim, channels)
        scale = 1.0 / math.sqrt(head_dim)
        k_back = torch.matmul(k, w_q) * scale  # B x H x N x C
        bias = (k * i2t.q_proj.bias.view(heads, 1, head_dim)).sum(-1) * scale  # B x H x N
        logits = torch.baddbmm(
            bias.reshape(batch, heads * n_tokens, 1).to(k_back.dtype),
            k_back.reshape(batch, heads * n_tokens, channels),
            keys_pe.transpose(1, 2).to(k_back.dtype),
        )  # B x (H*N) x L
        del keys_pe
        length = logits.shape[-1]
        # Softmax over the N tokens (dim 2 of B x H x N x L: fast, L is contiguous).
        weights = torch.softmax(logits.view(batch, heads, n_tokens, length), dim=2)
        weights = weights.view(batch, heads * n_tokens, length)
        keys = self._add_image_to_token(i2t, keys, weights, queries)
        return queries, block.norm4(keys)

    def run(
        self, sparse_embeddings: torch.Tensor, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the transformer and the IoU head for a batch of B prompts.

        Args:
            sparse_embeddings: BxNxC prompt-encoder output (points, padding point).
            multimask_output: select the 3 multimask outputs (else the single mask).

        Returns:
            ``(iou_pred, mask_tokens, image_tokens)``: predicted IoU BxM (M = 3 or 1,
            float32), the selected mask tokens' outputs BxMxC, and the processed image
            tokens BxLxC (L = 64*64) that :meth:`masks` upscales.
        """
        decoder = self.decoder
        transformer = decoder.transformer
        batch = sparse_embeddings.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_embeddings], dim=1)
        queries, keys = self._first_block(transformer.layers[0], tokens, tokens)
        for block in transformer.layers[1:]:
            queries, keys = self._later_block(block, queries, keys, tokens)

        mask_ids = list(range(2, decoder.num_mask_tokens + 1)) if multimask_output else [1]
        selected = [0] + mask_ids  # IoU token, then the chosen mask tokens
        sel_queries = queries[:, selected]
        out = _token_to_image(
            transformer.final_attn_token_to_image,
            sel_queries + tokens[:, selected],
            keys + self.key_pe,
            keys,
        )
        sel_queries = transformer.norm_final_attn(sel_queries + out)
        iou_pred = decoder.iou_prediction_head(sel_queries[:, 0])
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return iou_pred[:, chosen].float(), sel_queries[:, 1:], keys

    # -- masks -----------------------------------------------------------------------------

    def _upscale(self, grid: torch.Tensor) -> torch.Tensor:
        """``decoder.output_upscaling`` on a channels_last grid, LayerNorm2d as one fused op.

        The channel LayerNorm of a channels_last tensor is ``F.layer_norm`` over the last axis
        of its NHWC view (same formula, eps and affine; rounding differs slightly from the
        reference's hand-written mean/variance). Other module layouts run unchanged.
        """
        layers = list(self.decoder.output_upscaling)
        if len(layers) != 5 or not isinstance(layers[1], LayerNorm2d):
            return self.decoder.output_upscaling(grid)
        conv1, norm, act1, conv2, act2 = layers
        x = conv1(grid)
        nhwc = x.permute(0, 2, 3, 1)
        nhwc = F.layer_norm(nhwc, (nhwc.shape[-1],), norm.weight.to(nhwc.dtype), norm.bias.to(nhwc.dtype), norm.eps)
        x = act1(nhwc.permute(0, 3, 1, 2))
        return act2(conv2(x))

    def masks(
        self,
        mask_tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        prompt_index: torch.Tensor,
        output_index: torch.Tensor,
        multimask_output: bool = True,
        chunk: int = 16,
    ) -> torch.Tensor:
        """Low-res mask logits for the chosen (prompt, output) pairs only.

        Args:
            mask_tokens: BxMxC from :meth:`run`.
            image_tokens: BxLxC from :meth:`run`.
            prompt_index: K int64 prompt numbers in [0, B), ascending (e.g. from
                ``nonzero`` on a BxM keep mask).
            output_index: K int64 output numbers in [0, M).
            multimask_output: as given to :meth:`run` (selects the hypernetwork MLPs).
            chunk: prompts upscaled at once (bounds memory: ~8 MB per prompt in float32).

        Returns:
            Kx256x256 float32 logits (4h x 4w for an h x w embedding grid).
        """
        decoder = self.decoder
        first_mlp = 1 if multimask_output else 0
        n_out = mask_tokens.shape[1]
        hyper = torch.stack(
            [decoder.output_hypernetworks_mlps[first_mlp + j](mask_tokens[:, j]) for j in range(n_out)], dim=1
        )  # B x M x C/8
        height, width = self.grid_size
        channels = image_tokens.shape[-1]
        unique_prompts, inverse = torch.unique(prompt_index, sorted=True, return_inverse=True)
        out = torch.empty((prompt_index.shape[0], 4 * height, 4 * width), dtype=torch.float32, device=image_tokens.device)
        for start in range(0, unique_prompts.shape[0], chunk):
            prompts = unique_prompts[start : start + chunk]
            # BxLxC is the channels_last layout of BxCxhxw: a view, no copy.
            grid = image_tokens[prompts].transpose(1, 2).view(prompts.shape[0], channels, height, width)
            upscaled = self._upscale(grid)  # P x C/8 x 4h x 4w (channels_last)
            p, c, h, w = upscaled.shape
            pixels = upscaled.permute(0, 2, 3, 1).reshape(p, h * w, c)  # view when channels_last
            rows = (inverse >= start) & (inverse < start + prompts.shape[0])
            pair_rows = rows.nonzero().squeeze(1)
            local = inverse[pair_rows] - start
            per_prompt = torch.bmm(pixels, hyper[prompts].transpose(1, 2).to(pixels.dtype))  # P x hw x M
            logits = per_prompt[local, :, output_index[pair_rows]]  # k x hw
            out[pair_rows] = logits.view(-1, h, w).float()
            del upscaled, pixels, grid
        return out


def dense_no_mask_embedding(prompt_encoder: nn.Module) -> torch.Tensor:
    """The 1xCxhxw dense embedding used when no mask prompt is given (``no_mask_embed``)."""
    height, width = prompt_encoder.image_embedding_size
    return prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)


__all__ = ["PromptBatchDecoder", "dense_no_mask_embedding"]

