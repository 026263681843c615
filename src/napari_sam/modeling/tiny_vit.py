"""TinyViT image encoder of MobileSAM (the ``vit_t`` model type).

MobileSAM (Zhang et al. 2023, "Faster Segment Anything: Towards Lightweight SAM for Mobile
Applications") replaces SAM's ViT-H image encoder with a 5M-parameter TinyViT (Wu et al.
2022, "TinyViT: Fast Pretraining Distillation for Small Vision Transformers") distilled
from it, and keeps SAM's prompt encoder and mask decoder unchanged. The encoder maps a
normalised, padded 1024x1024 image to the same 256x64x64 image embedding as SAM.

Design (the facts of the papers and of MobileSAM's released weights):

* a convolutional stem (two 3x3 stride-2 convolutions, each with batch norm, GELU between)
  takes the image to a 64-channel 256x256 map;
* four stages of widths 64, 128, 160, 320 and depths 2, 2, 6, 2. The first stage is made
  of MBConv blocks (1x1 expand by 4, 3x3 depthwise, 1x1 project, residual, GELU); the
  others of transformer blocks with windowed attention (windows 7, 14 and 7 tokens; 4, 5
  and 10 heads; zero-padded to whole windows, padding tokens take part in attention), a
  3x3 depthwise convolution between attention and MLP, and an MLP of ratio 4. Attention
  adds a learned bias per head for every (|dy|, |dx|) offset inside a window;
* between stages a patch-merging block (1x1 conv, 3x3 depthwise conv, 1x1 conv, GELU
  between) changes the width. It halves the resolution after stages 1 and 2 and keeps it
  after stage 3, so the last stage runs on the 64x64 grid of SAM's embedding;
* a neck as SAM's (1x1 conv to 256 channels, LayerNorm2d, 3x3 conv, LayerNorm2d);
* every convolution is followed by batch norm (state-dict keys ``c`` and ``bn``); the
  classification head of TinyViT (``norm_head``, ``head``: 320 -> 1000) is kept in the
  checkpoint but unused.

Module and parameter names equal MobileSAM's state-dict keys, so ``mobile_sam.pt`` and
micro-sam's ``vit_t_*`` files load with strict matching. Stochastic depth (drop path) is 0
in MobileSAM's model and is left out.

Three rearrangements change only floating-point rounding: in eval mode every batch norm is
folded into its convolution's weights on the fly; windowed attention runs the norm and qkv
projection on the unpadded tokens and fills the padding with the projection of a zero token
(what the reference computes for its zero-padded tokens), and the output projection after
the windows are merged and cropped; the stem and the first stage run in channels-last memory
format, and the transformer stages keep tokens as BxHxWxC, which is channels-last for their
depthwise convolutions (several times faster than channels-first on CPUs).

The encoder can be run step by step, as the predictor does for progress and cancellation:
``patch_embed``, then each callable in ``blocks`` (one per block; stage-closing steps also
merge patches), then ``neck`` on the channels-first result. ``pos_embed`` is None.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d


class ConvBN(nn.Module):
    """A bias-free 2-D convolution followed by batch norm (keys ``c`` and ``bn``).

    In eval mode the batch norm's running statistics are folded into the convolution's
    weight and bias at each call (cheap: weights are small), saving a pass over the output.

    Args:
        in_chans, out_chans: channels.
        kernel_size, stride, padding, groups: of the convolution.
    """

    def __init__(
        self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxCxHxW -> BxC'xH'xW' (any memory format)."""
        if self.training:
            return self.bn(self.c(x))
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)


class PatchEmbed(nn.Module):
    """Convolutional stem: Bx3xHxW -> Bx(embed_dim)x(H/4)x(W/4) (keys ``seq.0``, ``seq.2``)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1), nn.GELU(), ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW -> BxCx(H/4)x(W/4) in channels-last memory format (which the convolutions of the
        first stage keep; depthwise convolutions run several times faster in it)."""
        return self.seq(x.contiguous(memory_format=torch.channels_last))


class MBConv(nn.Module):
    """Inverted-residual block of the first stage (MobileNetV2 style), channels-first.

    ``act3(x + conv3(act2(conv2(act1(conv1(x))))))`` with a 1x1 expansion by
    ``expand_ratio``, a 3x3 depthwise convolution and a 1x1 projection.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxCxHxW -> BxCxHxW."""
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Changes width (and resolution, with stride 2) between stages.

    Args:
        dim, out_dim: input and output channels.
        stride: of the depthwise convolution (2 halves the grid, 1 keeps it).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxCxHxW (channels first, any memory format) -> BxH'xW'xC' (channels last)."""
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.conv3(x).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Pre-norm MLP ``fc2(GELU(fc1(norm(x))))`` on the last dimension (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def window_offset_index(window_size: int) -> torch.Tensor:
    """Index into a per-window bias table for every (query, key) pair of a window.

    Tokens are numbered row-major inside a ``window_size`` x ``window_size`` window; the pair
    (p, q) uses the table entry of their absolute offset, ``|dy| * window_size + |dx|``
    (so the table has window_size**2 entries per head, as in TinyViT).

    Returns:
        int64 tensor NxN, N = window_size**2.
    """
    coords = torch.arange(window_size)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention inside non-overlapping square windows.

    The qkv projection yields, per token, ``num_heads`` groups of (q, k, v), each
    ``dim // num_heads`` wide (head-major layout, as in TinyViT's checkpoints). Logits are
    ``q k^T / sqrt(head_dim)`` plus ``attention_biases[head, offset(p, q)]``.

    Args:
        dim: token width C.
        num_heads: attention heads (C must be divisible by it).
        window_size: window side in tokens; sets the bias table size (heads x window_size**2).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.head_dim * num_heads)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("offset_index", window_offset_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxHxWxC tokens (channels last) -> BxHxWxC attention output (before the residual).

        The grid is zero-padded at the bottom and right to whole windows; padding tokens are
        keys and values for the real tokens of their window, as in TinyViT.
        """
        batch, height, width, _ = x.shape
        ws, heads, hd = self.window_size, self.num_heads, self.head_dim
        qkv = self.qkv(self.norm(x))
        pad_h, pad_w = (-height) % ws, (-width) % ws
        if pad_h or pad_w:
            # A zero token normalises to the norm's bias; its projection fills the padding.
            fill = self.qkv(self.norm.bias).to(qkv.dtype)
            padded = fill.expand(batch, height + pad_h, width + pad_w, fill.shape[-1]).clone()
            padded[:, :height, :width] = qkv
            qkv = padded
        rows, cols = (height + pad_h) // ws, (width + pad_w) // ws
        # B x rows x ws x cols x ws x heads x 3hd -> (B rows cols) x heads x (ws ws) x 3hd
        qkv = qkv.view(batch, rows, ws, cols, ws, heads, 3 * hd).permute(0, 1, 3, 5, 2, 4, 6)
        qkv = qkv.reshape(batch * rows * cols, heads, ws * ws, 3 * hd)
        q, k, v = qkv.split(hd, dim=-1)
        windows, tokens = q.shape[0], ws * ws
        bias = self.attention_biases[:, self.offset_index].to(q.dtype)
        # logits = bias + scale * q k^T, one fused call; softmax in place; then the values.
        logits = torch.baddbmm(
            bias.expand(windows, heads, tokens, tokens).reshape(windows * heads, tokens, tokens),
            q.reshape(windows * heads, tokens, hd), k.reshape(windows * heads, tokens, hd).transpose(1, 2),
            alpha=hd ** -0.5,
        )
        out = torch.bmm(logits.softmax(dim=-1), v.reshape(windows * heads, tokens, hd))
        # (B rows cols) x heads x (ws ws) x hd -> B x (rows ws) x (cols ws) x (heads hd)
        out = out.view(batch, rows, cols, heads, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(batch, rows * ws, cols * ws, heads * hd)
        if pad_h or pad_w:
            out = out[:, :height, :width]
        return self.proj(out)


class TinyViTBlock(nn.Module):
    """Transformer block of stages 2-4: ``x += attn(x)``; ``x = local_conv(x)``; ``x += mlp(x)``.

    ``local_conv`` is a 3x3 depthwise convolution with batch norm and no residual of its own.

    Args:
        dim: token width.
        num_heads: attention heads.
        window_size: attention window side in tokens.
        mlp_ratio: MLP hidden width relative to ``dim``.
        local_conv_size: kernel size of the depthwise convolution.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0,
                 local_conv_size: int = 3) -> None:
        super().__init__()
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxHxWxC -> BxHxWxC (channels last)."""
        x = x + self.attn(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """First stage: MBConv ``blocks`` and the ``downsample`` patch merging (channels first in)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample


class BasicLayer(nn.Module):
    """A transformer stage: TinyViT ``blocks`` and an optional ``downsample`` (channels last in)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int, downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample


class EncoderStep:
    """One step of the encoder after the stem: a block, then the stage's patch merging when
    the block is the stage's last.

    Layouts: steps of the first stage take BxCxHxW; all others take BxHxWxC. Every step
    returns BxHxWxC, except the first stage's non-final blocks (BxCxHxW). The last step
    returns the 64x64 grid, channels last (the neck takes it permuted to channels first).
    """

    def __init__(self, block: nn.Module, downsample: Optional[nn.Module], channels_first: bool) -> None:
        self.block = block
        self.downsample = downsample
        self.channels_first = channels_first

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.downsample is not None:
            x = self.downsample(x if self.channels_first else x.permute(0, 3, 1, 2))
        return x

    def __repr__(self) -> str:
        return f"EncoderStep({type(self.block).__name__}, downsample={self.downsample is not None})"


class TinyViT(nn.Module):
    """TinyViT image encoder as used by MobileSAM: normalised Bx3xSxS image -> Bx256x(S/16)x(S/16).

    Defaults are MobileSAM's ``vit_t`` (5.7M parameters in the encoder with its unused head).

    Args:
        img_size: side S of the square input (1024).
        in_chans: input channels.
        embed_dims: width of each stage.
        depths: blocks per stage (the first stage is MBConv, the others transformer blocks).
        num_heads: attention heads per stage (the entry of the first stage is unused).
        window_sizes: attention window side per stage (the entry of the first stage is unused).
        mlp_ratio: MLP hidden width relative to the stage width.
        mbconv_expand_ratio: expansion of the MBConv blocks.
        local_conv_size: kernel of the depthwise convolution inside transformer blocks.
        merge_strides: stride of the patch merging after each stage but the last (2, 2, 1:
            a 1024 input becomes 256 after the stem, then 128, 64, 64).
        out_chans: channels of the image embedding (256).
        num_classes: outputs of the unused classification head (1000 in MobileSAM's files).

    Attributes:
        img_size: S, read by the predictor.
        pos_embed: None (no absolute position embedding).
        blocks: the steps after the stem, see :class:`EncoderStep`.
    """

    pos_embed: Optional[torch.Tensor] = None

    def __init__(
        self, img_size: int = 1024, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7), mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3, merge_strides: Sequence[int] = (2, 2, 1), out_chans: int = 256,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        stages = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == stages and len(merge_strides) == stages - 1):
            raise ValueError("embed_dims, depths, num_heads, window_sizes need one entry per stage, "
                             "merge_strides one fewer.")
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers = []
        for i, dim in enumerate(embed_dims):
            merge = PatchMerging(dim, embed_dims[i + 1], merge_strides[i]) if i + 1 < stages else None
            if i == 0:
                layers.append(ConvLayer(dim, depths[0], mbconv_expand_ratio, merge))
            else:
                layers.append(BasicLayer(dim, depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                         local_conv_size, merge))
        self.layers = nn.ModuleList(layers)
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @property
    def blocks(self) -> tuple[EncoderStep, ...]:
        """The steps after ``patch_embed``, one per block (not modules: the weights live in ``layers``)."""
        steps = []
        for i, layer in enumerate(self.layers):
            for j, block in enumerate(layer.blocks):
                last = j == len(layer.blocks) - 1
                steps.append(EncoderStep(block, layer.downsample if last else None, channels_first=i == 0))
        return tuple(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS normalised image -> Bx(out_chans)x(S/16)x(S/16) image embedding (float)."""
        x = self.patch_embed(x)
        for step in self.blocks:
            x = step(x)
        return self.neck(x.permute(0, 3, 1, 2))
