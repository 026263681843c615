"""Architecture module: MobileSAM, SAM with a TinyViT image encoder (the ``vit_t`` type).

MobileSAM (Zhang et al. 2023) distils SAM's image encoder into a TinyViT (Wu et al. 2022;
see :mod:`napari_sam.modeling.tiny_vit`) and keeps SAM's prompt encoder and mask decoder
(256-wide, 64x64 embedding grid, 1024 px input). :class:`TinyViTSamConfig` builds the
untrained model with the state-dict keys of ``mobile_sam.pt`` (and of micro-sam's ``vit_t_*``
files) and recognises those state dicts by their tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .sam_vit import assemble_sam

if TYPE_CHECKING:
    from ..modeling import Sam

_PREFIX = "image_encoder."
_STEM = _PREFIX + "patch_embed.seq.0.c.weight"


@dataclass(frozen=True)
class TinyViTSamConfig:
    """Sizes of a SAM with a TinyViT image encoder; the defaults are MobileSAM's.

    Attributes:
        embed_dims: width of each encoder stage.
        depths: blocks per stage (the first stage is MBConv blocks).
        num_heads: attention heads per stage (first entry unused).
        window_sizes: attention window side per stage in tokens (first entry unused).
        img_size: side of the square model input in pixels.
        prompt_embed_dim: channels of the image embedding and width of the prompt tokens.
        num_classes: outputs of TinyViT's unused classification head (kept for the keys).
        decoder_mlp_dim, decoder_num_heads: two-way transformer MLP width and heads.
        iou_head_hidden_dim: hidden width of the IoU prediction head.
        mask_in_chans: hidden channels of the mask-prompt downscaling convolutions.
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    img_size: int = 1024
    prompt_embed_dim: int = 256
    num_classes: int = 1000
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16

    @property
    def grid(self) -> int:
        """Side of the image embedding in tokens: the stem divides by 4, two merges by 2 (64)."""
        return self.img_size // 16

    def build(self) -> "Sam":
        """An untrained MobileSAM of these sizes, in eval mode (random weights from torch's generator)."""
        from ..modeling.tiny_vit import TinyViT

        encoder = TinyViT(
            img_size=self.img_size, embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads,
            window_sizes=self.window_sizes, out_chans=self.prompt_embed_dim, num_classes=self.num_classes,
        )
        return assemble_sam(encoder, self)

    def fits(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether a state dict's tensor shapes say it is a TinyViT SAM of these sizes (see
        :func:`tiny_vit_shape`); ViT-based SAM state dicts (``image_encoder.pos_embed``) never fit."""
        shape = tiny_vit_shape(state_dict)
        return shape is not None and (shape.embed_dims, shape.depths, shape.num_heads, shape.window_sizes) == (
            self.embed_dims, self.depths, self.num_heads[1:], self.window_sizes[1:]
        ) and shape.out_chans in (None, self.prompt_embed_dim)

    def describe(self) -> str:
        """One line for error messages."""
        return f"TinyViT encoder, stages {list(self.embed_dims)} wide, {list(self.depths)} deep"


@dataclass(frozen=True)
class TinyViTShape:
    """What a state dict's tensor shapes say about its TinyViT image encoder.

    Attributes:
        embed_dims: stage widths (MBConv input channels for stage 0, token width after).
        depths: blocks per stage (highest block index + 1).
        num_heads: heads of the transformer stages (rows of ``attention_biases``).
        window_sizes: window sides of the transformer stages (sqrt of its columns).
        out_chans: embedding channels of the neck, or None when its key is missing.
    """

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_sizes: tuple[int, ...]
    out_chans: Optional[int]


def tiny_vit_shape(state_dict: Mapping[str, Any]) -> Optional[TinyViTShape]:
    """Read a TinyViT encoder's sizes off a state dict; None when it is not one (no stem
    ``image_encoder.patch_embed.seq.0.c.weight``, a ViT ``image_encoder.pos_embed``, or blocks
    that are not MBConv then attention)."""
    if _STEM not in state_dict or _PREFIX + "pos_embed" in state_dict:
        return None
    depth: dict[int, int] = {}
    for key in state_dict:
        parts = str(key).split(".")
        if len(parts) > 4 and parts[1] == "layers" and parts[3] == "blocks":
            stage, block = int(parts[2]), int(parts[4])
            depth[stage] = max(depth.get(stage, 0), block + 1)
    if not depth or sorted(depth) != list(range(len(depth))):
        return None
    dims, heads, windows = [], [], []
    for stage in sorted(depth):
        block = f"{_PREFIX}layers.{stage}.blocks.0."
        if stage == 0:
            conv = state_dict.get(block + "conv1.c.weight")
            if conv is None:
                return None
            dims.append(int(conv.shape[1]))
            continue
        qkv, biases = state_dict.get(block + "attn.qkv.weight"), state_dict.get(block + "attn.attention_biases")
        if qkv is None or biases is None or getattr(biases, "ndim", 0) != 2:
            return None
        dims.append(int(qkv.shape[1]))
        heads.append(int(biases.shape[0]))
        windows.append(round(int(biases.shape[1]) ** 0.5))
    neck = state_dict.get(_PREFIX + "neck.0.weight")
    return TinyViTShape(tuple(dims), tuple(depth[s] for s in sorted(depth)), tuple(heads), tuple(windows),
                        None if neck is None else int(neck.shape[0]))
