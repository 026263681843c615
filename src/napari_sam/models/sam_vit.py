"""Architecture module: SAM with the ViT image encoder of the paper (vit_b / vit_l / vit_h and
the project's smaller configurations of the same design).

One :class:`SamConfig` holds every size; :meth:`SamConfig.build` makes the untrained model and
:meth:`SamConfig.fits` tells from a state dict's tensor shapes whether it is a model of these
sizes. The model registry (:mod:`napari_sam.models.zoo`) declares one config per model type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from ..modeling import Sam

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
PATCH_SIZE = 16


@dataclass(frozen=True)
class SamConfig:
    """Sizes of a SAM model with a ViT image encoder. Defaults after the encoder fields are the official ones
    (Kirillov et al. 2023, appendix A; the reference's ``build_sam.py``).

    Attributes:
        embed_dim, depth, num_heads: ViT image encoder width, blocks and heads.
        global_attn_indexes: encoder blocks with global attention (the others use windows).
        img_size: side of the square model input in pixels.
        patch_size: side of a patch in pixels (the embedding grid is img_size / patch_size).
        window_size: side of the attention windows in tokens.
        prompt_embed_dim: channels of the image embedding and width of the prompt tokens.
        decoder_mlp_dim, decoder_num_heads: two-way transformer MLP width and heads.
        iou_head_hidden_dim: hidden width of the IoU prediction head.
        mask_in_chans: hidden channels of the mask-prompt downscaling convolutions.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    window_size: int = 14
    prompt_embed_dim: int = PROMPT_EMBED_DIM
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16

    @property
    def grid(self) -> int:
        """Side of the image embedding in tokens (64 for the official models)."""
        return self.img_size // self.patch_size

    def build(self) -> "Sam":
        """An untrained SAM of these sizes, in eval mode (random weights from torch's generator)."""
        from functools import partial

        from torch import nn

        from ..modeling import ImageEncoderViT

        encoder = ImageEncoderViT(
            depth=self.depth, embed_dim=self.embed_dim, img_size=self.img_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=self.num_heads, patch_size=self.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=self.global_attn_indexes,
            window_size=self.window_size, out_chans=self.prompt_embed_dim,
        )
        return assemble_sam(encoder, self)

    def fits(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether a state dict's tensor shapes say it is a model of these sizes (see
        :func:`encoder_shape`); keys that are missing make it not fit, and the strict load then
        reports the details."""
        shape = encoder_shape(state_dict)
        return shape is not None and shape.embed_dim == self.embed_dim and shape.depth == self.depth and (
            shape.global_blocks == self.global_attn_indexes and shape.grid == self.grid
            and shape.out_chans in (None, self.prompt_embed_dim)
        )

    def describe(self) -> str:
        """One line for error messages: width, depth and global blocks."""
        return f"ViT encoder {self.embed_dim} wide, {self.depth} blocks, global attention in {list(self.global_attn_indexes)}"


@dataclass(frozen=True)
class EncoderShape:
    """What a state dict's tensor shapes say about its ViT image encoder.

    Attributes:
        embed_dim: token width, from ``image_encoder.pos_embed`` (1xGxGxD).
        grid: G, the embedding grid side in tokens.
        depth: number of blocks (highest block index + 1).
        global_blocks: blocks whose relative-position tables have 2G-1 rows (global attention).
        out_chans: embedding channels of the neck, or None when its key is missing.
    """

    embed_dim: int
    grid: int
    depth: int
    global_blocks: tuple[int, ...]
    out_chans: Optional[int]


def encoder_shape(state_dict: Mapping[str, Any]) -> Optional[EncoderShape]:
    """Read the ViT image encoder's sizes off a state dict; None without a 1xGxGxD ``image_encoder.pos_embed``."""
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None or getattr(pos, "ndim", 0) != 4:
        return None
    grid = int(pos.shape[1])
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")}
    global_blocks = tuple(
        sorted(
            i for i in blocks
            if f"image_encoder.blocks.{i}.attn.rel_pos_h" in state_dict
            and state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * grid - 1
        )
    )
    neck = state_dict.get("image_encoder.neck.0.weight")
    return EncoderShape(int(pos.shape[-1]), grid, max(blocks) + 1 if blocks else 0, global_blocks,
                        None if neck is None else int(neck.shape[0]))


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
    """What a state dict's image encoder looks like, for an error message that no config fits."""
    shape = encoder_shape(state_dict)
    if shape is None:
        return "no 'image_encoder.pos_embed' tensor of shape 1xGxGxD"
    return (f"embed dim {shape.embed_dim}, {shape.depth} blocks, {shape.grid}x{shape.grid} grid, "
            f"global attention in blocks {list(shape.global_blocks)}")


def assemble_sam(image_encoder: Any, config: Any) -> "Sam":
    """SAM around ``image_encoder``: the prompt encoder and mask decoder sized by ``config``, in eval mode.

    ``config`` gives ``prompt_embed_dim``, ``grid`` (embedding side), ``img_size``,
    ``mask_in_chans``, ``decoder_mlp_dim``, ``decoder_num_heads`` and ``iou_head_hidden_dim``
    (the reference's decoder: a two-layer two-way transformer, 3 multimask outputs, a 3-layer
    IoU head). Shared by every architecture whose prompt side is SAM's.
    """
    from ..modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim, image_embedding_size=(config.grid, config.grid),
        input_image_size=(config.img_size, config.img_size), mask_in_chans=config.mask_in_chans,
    )
    transformer = TwoWayTransformer(
        depth=2, embedding_dim=config.prompt_embed_dim, mlp_dim=config.decoder_mlp_dim,
        num_heads=config.decoder_num_heads,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3, transformer=transformer, transformer_dim=config.prompt_embed_dim,
        iou_head_depth=3, iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()
