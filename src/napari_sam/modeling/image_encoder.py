"""ViT image encoder of Segment Anything (ViTDet-style backbone).

The image is cut into 16x16 patches (a 64x64 token grid for a 1024x1024 input), passed
through transformer blocks that alternate windowed attention (14x14 windows) with a few
global-attention blocks, and projected by a convolutional neck to a 256x64x64 image
embedding. Attention adds decomposed relative-position terms (MViTv2, Li et al. 2022,
sec. 4.1; ViTDet, Li et al. 2022). Module and parameter names equal the official
checkpoint's state-dict keys.

Numerically this module computes what the reference computes, with three rearrangements
that change only floating-point rounding:

* windowed blocks run the qkv projection on the unpadded token grid and fill the padding
  with the projection of a zero vector (``qkv.bias``), which is exactly what the reference
  computes for its zero-padded tokens; the output projection runs after the windows are
  merged and cropped, so no work is spent on padding tokens;
* attention is evaluated in cache-sized blocks of query rows: the relative-position
  terms of a block are summed, the scaled q k^T is accumulated onto them (``baddbmm``),
  and softmax and the product with v follow while the block is still in cache. The
  reference holds heads x N x N logits in main memory (805 MB per global block of
  ViT-B) and passes over them five times.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock

# Attention logits are processed in blocks of about this many elements (16 MiB in fp32),
# small enough for the last-level cache between the bias, softmax and value steps and
# large enough that per-call thread synchronisation stays negligible (measured: 2^20 is
# 2x slower than 2^22 on a loaded 2-core machine).
_LOGITS_BLOCK = 1 << 22


class ImageEncoderViT(nn.Module):
    """Vision transformer that maps a normalised, padded image to an image embedding.

    Args:
        img_size: side of the square input in pixels (1024 for the official models).
        patch_size: side of a patch in pixels.
        in_chans: number of input channels.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP relative to D.
        out_chans: channels of the image embedding (256).
        qkv_bias: whether the qkv projection has a bias.
        norm_layer: token normalisation layer (LayerNorm with eps 1e-6 in SAM).
        act_layer: MLP activation.
        use_abs_pos: add a learned absolute position embedding (1 x G x G x D).
        use_rel_pos: add decomposed relative-position terms to the attention logits.
        rel_pos_zero_init: initialise the relative-position tables with zeros.
        window_size: attention window side in tokens for the windowed blocks (0: global).
        global_attn_indexes: indices of the blocks that attend over the whole grid.
    """

    def __init__(
        self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3,
        embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
        out_chans: int = 256, qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True, use_rel_pos: bool = False, rel_pos_zero_init: bool = True,
        window_size: int = 0, global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        patch = (patch_size, patch_size)
        self.patch_embed = PatchEmbed(patch, patch, (0, 0), in_chans, embed_dim)
        self.pos_embed: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        )
        block = partial(
            Block, embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer, act_layer, use_rel_pos, rel_pos_zero_init
        )
        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            [block(window_size=0 if i in global_set else window_size, input_size=(grid, grid)) for i in range(depth)]
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: Bx3xSxS float tensor, normalised and zero-padded (``Sam.preprocess``), S = img_size.

        Returns:
            Bx(out_chans)x(S/patch)x(S/patch) image embedding.
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class Block(nn.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False, rel_pos_zero_init: bool = True, window_size: int = 0,
        input_size: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        # Windowed blocks size their relative-position tables for one window.
        grid = (window_size, window_size) if window_size > 0 else input_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init, grid)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BxHxWxD tokens; returns the same shape."""
        normed = self.norm1(x)
        if self.window_size > 0:
            x = x + self.attn.forward_windowed(normed, self.window_size)
        else:
            x = x + self.attn(normed)
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention with optional decomposed relative-position terms.

    Args:
        dim: token width.
        num_heads: number of heads; head width is dim / num_heads.
        qkv_bias: whether the qkv projection has a bias.
        use_rel_pos: add relative-position terms (needs ``input_size``).
        rel_pos_zero_init: zero-initialise the relative-position tables.
        input_size: token grid (H, W) the tables are sized for: (2H-1) x head_dim rows.
    """

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True, input_size: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads, self.use_rel_pos = num_heads, use_rel_pos
        self.scale = head_dim**-0.5  # as the reference computes it, to the last bit
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=qkv_bias), nn.Linear(dim, dim)
        if not use_rel_pos:
            return
        if input_size is None:
            raise ValueError("Relative positional terms need input_size=(H, W) of the token grid.")
        # One row per relative offset along each axis: 2H-1 and 2W-1 rows.
        tables = [torch.zeros(2 * side - 1, head_dim) for side in input_size]
        if not rel_pos_zero_init:
            tables = [nn.init.trunc_normal_(table, std=0.02) for table in tables]
        self.rel_pos_h, self.rel_pos_w = (nn.Parameter(table) for table in tables)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over the whole grid. x: BxHxWxD; returns BxHxWxD."""
        batch, height, width, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        # (B, H, W, 3, heads, hd) -> (3, B*heads, H*W, hd): one copy.
        qkv = self.qkv(x).view(batch, height * width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = _to_float32_contiguous(qkv).view(3, batch * heads, height * width, head_dim).unbind(0)
        out = self._attend(q, k, v, (height, width))
        out = out.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim)
        return self.proj(out)

    def forward_windowed(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Attention inside non-overlapping window x window tiles.

        The grid is padded at the bottom/right to a multiple of ``window``; as in the
        reference, padding tokens are zero vectors that take part in the attention
        unmasked. Their qkv projection is ``qkv.bias``, which is what fills the padding
        here, so the projection itself runs on the unpadded grid.

        Args:
            x: BxHxWxD normalised tokens.
            window: window side in tokens.

        Returns:
            BxHxWxD attention output (after the output projection).
        """
        batch, height, width, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        qkv = self.qkv(x)
        pad_h = (window - height % window) % window
        pad_w = (window - width % window) % window
        if pad_h or pad_w:
            padded = qkv.new_empty(batch, height + pad_h, width + pad_w, 3 * dim)
            padded[:, :height, :width] = qkv
            fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(3 * dim)
            padded[:, height:] = fill
            padded[:, :height, width:] = fill
            qkv = padded
        rows, cols = (height + pad_h) // window, (width + pad_w) // window
        # (B, rows, wy, cols, wx, 3, heads, hd) -> (3, B*rows*cols*heads, wy*wx, hd): one copy.
        tiles = qkv.view(batch, rows, window, cols, window, 3, heads, head_dim).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = _to_float32_contiguous(tiles).view(3, batch * rows * cols * heads, window * window, head_dim).unbind(0)
        out = self._attend(q, k, v, (window, window))
        out = (
            out.view(batch, rows, cols, heads, window, window, head_dim)
            .permute(0, 1, 4, 2, 5, 3, 6)
            .reshape(batch, rows * window, cols * window, dim)
        )
        if pad_h or pad_w:
            out = out[:, :height, :width]
        return self.proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """softmax(scale * q k^T + relative-position terms) v, in cache-sized blocks.

        The logits of a block of query rows are formed, normalised and multiplied by v
        before the next block starts, so the NxN logits never travel through main memory
        as a whole (the reference materialises heads x N x N floats several times).

        Runs in float32 even under autocast: in reduced precision only the projections
        and the MLP (most of the work) run in bf16/fp16, while the logits and softmax stay
        exact enough and need no per-block casts.

        Args:
            q, k, v: BxNxd float32 queries, keys and values of an HxW token grid
                (N = H*W), one batch entry per (image or window, head).
            grid: (H, W).

        Returns:
            BxNxd float32 attention output.
        """
        with torch.autocast(device_type=q.device.type, enabled=False):
            return self._attend_fp32(q, k, v, grid)

    def _attend_fp32(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, tokens, _ = q.shape
        if self.use_rel_pos:
            row_term, col_term = rel_pos_terms(q, self.rel_pos_h.float(), self.rel_pos_w.float(), grid)
        if torch.is_grad_enabled() and (q.requires_grad or (self.use_rel_pos and self.rel_pos_h.requires_grad)):
            # Training: one fused attention call (autograd through the in-place blocked loop
            # below would be slower), with the relative-position terms folded into the
            # queries and keys rather than passed as a dense NxN mask.
            if not self.use_rel_pos:
                return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            return attention_with_rel_pos_keys(q, k, v, row_term, col_term, grid, self.scale)
        k_t = k.transpose(1, 2).contiguous()
        out = torch.empty_like(q)
        rows = min(tokens, max(1, _LOGITS_BLOCK // tokens))
        items = max(1, _LOGITS_BLOCK // (rows * tokens))
        for b0 in range(0, batch, items):
            bs = slice(b0, b0 + items)
            for r0 in range(0, tokens, rows):
                rs = slice(r0, r0 + rows)
                if self.use_rel_pos:
                    logits = torch.add(row_term[bs, rs].unsqueeze(-1), col_term[bs, rs].unsqueeze(-2))
                    logits = logits.view(logits.shape[0], logits.shape[1], tokens)
                    logits.baddbmm_(q[bs, rs], k_t[bs], alpha=self.scale)
                else:
                    logits = torch.bmm(q[bs, rs], k_t[bs]).mul_(self.scale)
                out[bs, rs] = torch.bmm(torch.softmax(logits, dim=-1), v[bs])
        return out


def attention_with_rel_pos_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_term: torch.Tensor, col_term: torch.Tensor,
    grid: tuple[int, int], scale: float,
) -> torch.Tensor:
    """softmax(scale * q k^T + row[n, y'] + col[n, x']) v as one fused attention without a mask.

    The decomposed relative-position terms (see :func:`rel_pos_terms`) enter the logits as
    extra query and key channels: the query of token n gains its H row terms and W column
    terms, the key of token (y', x') gains one-hot indicators of its row y' and column x',
    so their dot product adds exactly ``row[n, y'] + col[n, x']``. The queries are scaled
    beforehand (``scale * q``), so the kernel runs with scale 1. v is zero-padded to the
    same width (the fused CPU kernel needs equal widths) and cropped afterwards.

    Compared with passing the HW x HW bias as a dense mask, which is materialised and
    differentiated as a whole, this keeps the fused kernel's blocked softmax, which makes
    a global block's forward and backward faster (timings in
    docs/small-model-experiments.md, ``experiments/bench_rel_pos_attention.py``). The
    result equals the dense form up to float32 rounding (about 1e-6).

    Args:
        q, k, v: BxNxd queries, keys and values of an HxW token grid (N = H*W); float32,
            or bfloat16 under autocast.
        row_term: BxNxH row terms; col_term: BxNxW column terms (unscaled, as in the reference).
        grid: (H, W).
        scale: the logit scale (head_dim ** -0.5).

    Returns:
        BxNxd attention output.
    """
    height, width = grid
    batch, tokens, head_dim = q.shape
    position = torch.arange(tokens, device=q.device)
    indicators = torch.cat(
        [F.one_hot(position // width, height), F.one_hot(position % width, width)], dim=1
    ).to(q.dtype)  # N x (H + W): each key's row and column
    extra = height + width
    q_aug = torch.cat([q * scale, row_term, col_term], dim=-1)
    k_aug = torch.cat([k, indicators.expand(batch, tokens, extra)], dim=-1)
    v_pad = torch.cat([v, v.new_zeros(batch, tokens, extra)], dim=-1)
    return F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)[..., :head_dim]


def _to_float32_contiguous(x: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy of a (permuted) view, cast and rearranged in one pass."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out.copy_(x)
    return out


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair along one axis.

    The table has one row per relative offset; it is linearly resized when its length is
    not 2*max(q_size, k_size)-1, and offsets are rescaled when the query and key grids
    differ in size (MViTv2, Li et al. 2022).

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: Lxhead_dim table.

    Returns:
        q_size x k_size x head_dim tensor.
    """
    span = 2 * max(q_size, k_size) - 1
    table = rel_pos
    if table.shape[0] != span:
        table = (
            F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=span, mode="linear")
            .reshape(-1, span)
            .permute(1, 0)
        )
    q_step = max(k_size / q_size, 1.0)
    k_step = max(q_size / k_size, 1.0)
    q_pos = torch.arange(q_size, device=rel_pos.device)[:, None] * q_step
    k_pos = torch.arange(k_size, device=rel_pos.device)[None, :] * k_step
    offset = (q_pos - k_pos) + (k_size - 1) * k_step
    return table[offset.long()]


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int],
    k_grid: Optional[tuple[int, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decomposed relative-position terms of the attention logits (MViTv2, sec. 4.1).

    For a query at (y, x) and a key at (y', x'), the logit gains
    ``row[(y, x), y'] + col[(y, x), x']`` with ``row = q . R_h[y, y']`` and
    ``col = q . R_w[x, x']``, computed from the unscaled queries as in the reference.

    Args:
        q: BxNxC queries of an HxW grid (N = H*W).
        rel_pos_h: Lh x C table, rel_pos_w: Lw x C table ((2H-1) and (2W-1) rows for
            equal query and key grids; other lengths are resized by :func:`get_rel_pos`).
        grid: (H, W) of the queries.
        k_grid: (Hk, Wk) of the keys; default ``grid``.

    Returns:
        row term BxNxHk and column term BxNxWk.
    """
    height, width = grid
    k_height, k_width = grid if k_grid is None else k_grid
    batch, tokens, channels = q.shape
    q_grid = q.reshape(batch, height, width, channels)
    table_h = get_rel_pos(height, k_height, rel_pos_h)
    table_w = get_rel_pos(width, k_width, rel_pos_w)
    row_term = torch.einsum("byxc,ykc->byxk", q_grid, table_h).reshape(batch, tokens, k_height)
    col_term = torch.einsum("byxc,xkc->byxk", q_grid, table_w).reshape(batch, tokens, k_width)
    return row_term, col_term


def add_decomposed_rel_pos(
    attn: torch.Tensor, q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    q_size: tuple[int, int], k_size: tuple[int, int],
) -> torch.Tensor:
    """Attention logits plus the decomposed relative-position terms (MViTv2, Li et al. 2022, sec. 4.1).

    The reference's function: ``attn[b, (y, x), (y', x')] + q[b, (y, x)] . R_h[y, y'] +
    q[b, (y, x)] . R_w[x, x']`` with the tables of :func:`get_rel_pos` (see
    :func:`rel_pos_terms`). The encoder's own attention adds the same terms block by block
    (:meth:`Attention._attend`) instead of on a full logits tensor.

    Args:
        attn: B x (qh*qw) x (kh*kw) attention logits.
        q: B x (qh*qw) x C queries (unscaled), rows in row-major (y, x) order.
        rel_pos_h: Lh x C table along the height; rel_pos_w: Lw x C table along the width.
        q_size: (qh, qw) grid of the queries; k_size: (kh, kw) grid of the keys.

    Returns:
        A new B x (qh*qw) x (kh*kw) tensor.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    row_term, col_term = rel_pos_terms(q, rel_pos_h, rel_pos_w, (q_h, q_w), (k_h, k_w))
    batch = attn.shape[0]
    grid_logits = attn.view(batch, q_h * q_w, k_h, k_w) + row_term[..., :, None] + col_term[..., None, :]
    return grid_logits.view(batch, q_h * q_w, k_h * k_w)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Cut a token grid into non-overlapping square windows, zero-padding it bottom/right.

    The reference's layout: windows are ordered image by image, then row-major over the
    window grid. (The encoder's windowed blocks partition their qkv projections instead,
    see :meth:`Attention.forward_windowed`.)

    Args:
        x: BxHxWxC tokens.
        window_size: window side s in tokens.

    Returns:
        (windows of shape (B*nh*nw) x s x s x C, with nh = Hp/s and nw = Wp/s;
        (Hp, Wp), the padded grid size, multiples of s).
    """
    batch, height, width, channels = x.shape
    pad_h, pad_w = -height % window_size, -width % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # last axis first: C, then W, then H
    padded = (height + pad_h, width + pad_w)
    rows, cols = padded[0] // window_size, padded[1] // window_size
    tiles = x.view(batch, rows, window_size, cols, window_size, channels).transpose(2, 3)
    return tiles.reshape(batch * rows * cols, window_size, window_size, channels), padded


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: reassemble windows and crop the padding.

    Args:
        windows: (B*nh*nw) x s x s x C windows in :func:`window_partition`'s order.
        window_size: window side s.
        pad_hw: (Hp, Wp), the padded grid size.
        hw: (H, W), the grid size before padding.

    Returns:
        BxHxWxC tokens (contiguous).
    """
    (padded_h, padded_w), (height, width) = pad_hw, hw
    rows, cols = padded_h // window_size, padded_w // window_size
    batch = windows.shape[0] // (rows * cols)
    grid = windows.view(batch, rows, cols, window_size, window_size, -1).transpose(2, 3)
    grid = grid.reshape(batch, padded_h, padded_w, -1)
    return grid[:, :height, :width].contiguous()


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: Bx3xSxS image -> BxGxGxD tokens (channels last)."""

    def __init__(
        self, kernel_size: tuple[int, int] = (16, 16), stride: tuple[int, int] = (16, 16),
        padding: tuple[int, int] = (0, 0), in_chans: int = 3, embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)
