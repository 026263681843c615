"""Model registry: build SAM by type and load checkpoints with strict key matching.

``sam_model_registry[name](checkpoint=path)`` works as in the reference for ``default``
(= ``vit_h``), ``vit_h``, ``vit_l`` and ``vit_b``; ``vit_test`` is a small random-weight
configuration (same decoder, 2-block 64-wide encoder) for fast tests. Checkpoints load on
the CPU with ``weights_only=True``; a checkpoint made for another type raises an error that
names the type it fits, detected from the tensor shapes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
PATCH_SIZE = 16


@dataclass(frozen=True)
class SamConfig:
    """Sizes of a SAM model. The defaults after the encoder fields are the official ones.

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


EncoderConfig = SamConfig  # the name used before the decoder sizes became configurable

# The project's own small model (issue 7): 256 px input, 8 px patches (a 32x32 embedding
# grid, so 128x128 low-res masks at half the input resolution), a 128-wide decoder.
SMALL_MODEL_CONFIG = SamConfig(
    embed_dim=192, depth=6, num_heads=6, global_attn_indexes=(2, 5), img_size=256, patch_size=8,
    window_size=8, prompt_embed_dim=128, decoder_mlp_dim=1024, decoder_num_heads=4,
    iou_head_hidden_dim=128, mask_in_chans=16,
)

MODEL_CONFIGS: dict[str, SamConfig] = {
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_test": SamConfig(64, 2, 2, (1,)),
    "vit_small": SMALL_MODEL_CONFIG,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the requested model."""


def build_sam_from_config(config: SamConfig) -> Sam:
    """Build an untrained SAM (in eval mode) with the given sizes."""
    grid = config.img_size // config.patch_size
    encoder = ImageEncoderViT(
        depth=config.depth,
        embed_dim=config.embed_dim,
        img_size=config.img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=config.num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size,
        out_chans=config.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.img_size, config.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=config.prompt_embed_dim, mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()


def read_state_dict(checkpoint: PathLike) -> dict[str, torch.Tensor]:
    """Read a SAM state dict from a file, on the CPU, with ``weights_only=True``.

    Accepts a bare state dict or one stored under a ``"model"`` or ``"state_dict"`` key
    (common for fine-tuned checkpoints); a ``"module."`` prefix (DataParallel) is removed.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a PyTorch checkpoint holding a SAM state dict.
    """
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path!r} (expected a .pth file).")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(
            f"Could not read {path!r} as a PyTorch checkpoint (torch.load with weights_only=True): {error}"
        ) from error
    state = loaded
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if key in loaded and isinstance(loaded[key], Mapping):
                state = loaded[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path!r} does not hold a state dict (a mapping of names to tensors, bare or under "
            f"'model' / 'state_dict'); found {type(loaded).__name__}."
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Tell the registry type of a SAM state dict from its tensor shapes.

    The encoder width and grid come from ``image_encoder.pos_embed`` (1xGxGxD), the
    embedding channels from the neck, the depth from
    the block indices, and the global-attention blocks from the relative-position table
    lengths (2G-1 rows for global blocks, 27 for 14x14 windows).

    Returns:
        "vit_b", "vit_l", "vit_h", "vit_test" or "vit_small".

    Raises:
        CheckpointError: the state dict is not a SAM model or of no known type.
    """
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4:
        raise CheckpointError(
            "Not a Segment Anything state dict: no 'image_encoder.pos_embed' tensor of shape 1xGxGxD."
        )
    embed_dim = int(pos.shape[-1])
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    global_blocks = tuple(
        sorted(
            i
            for i in blocks
            if f"image_encoder.blocks.{i}.attn.rel_pos_h" in state_dict
            and state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * pos.shape[1] - 1
        )
    )
    grid = int(pos.shape[1])
    neck = state_dict.get("image_encoder.neck.0.weight")
    out_chans = int(neck.shape[0]) if neck is not None else None
    for name, config in MODEL_CONFIGS.items():
        if (
            (config.embed_dim, config.depth, config.global_attn_indexes) == (embed_dim, depth, global_blocks)
            and config.img_size // config.patch_size == grid
            and out_chans in (None, config.prompt_embed_dim)
        ):
            return name
    raise CheckpointError(
        f"Unknown SAM image encoder in checkpoint: embed dim {embed_dim}, {depth} blocks, global attention "
        f"in blocks {list(global_blocks)}; known types: {', '.join(MODEL_CONFIGS)}."
    )


def _check_fits(state_dict: Mapping[str, torch.Tensor], model_type: str) -> None:
    """Raise when the tensor shapes say the state dict is of another known type."""
    try:
        fits = detect_model_type(state_dict)
    except CheckpointError:
        return  # not recognisable: the strict key check reports what is wrong
    if fits != model_type:
        raise CheckpointError(
            f"This checkpoint is a {fits} model, not {model_type}: build it with "
            f"sam_model_registry[{fits!r}] (or napari_sam.build_sam, which detects the type)."
        )


def load_state_dict_strict(model: Sam, state_dict: Mapping[str, torch.Tensor], model_type: str) -> None:
    """Load ``state_dict`` into ``model`` with strict key and shape matching.

    Raises:
        CheckpointError: the state dict fits another type (named in the message) or has
            missing, unexpected or mis-shaped tensors.
    """
    _check_fits(state_dict, model_type)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        def preview(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({preview(missing)})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys ({preview(unexpected)})")
        if wrong:
            problems.append(f"wrong shapes for {preview(wrong)}")
        raise CheckpointError(f"Checkpoint does not fit a {model_type} SAM: " + "; ".join(problems) + ".")
    model.load_state_dict(state_dict, strict=True)


def build_sam_type(model_type: str, checkpoint: Optional[PathLike] = None) -> Sam:
    """Build a SAM of a registry type, loading ``checkpoint`` (a path) when given.

    Raises:
        KeyError: unknown ``model_type``.
        FileNotFoundError, CheckpointError: see :func:`read_state_dict` and
            :func:`load_state_dict_strict`.
    """
    if model_type == "default":
        model_type = "vit_h"
    if model_type not in MODEL_CONFIGS:
        raise KeyError(f"Unknown SAM model type {model_type!r}; expected one of default, {', '.join(MODEL_CONFIGS)}.")
    state = read_state_dict(checkpoint) if checkpoint is not None else None
    if state is not None:
        _check_fits(state, model_type)  # before building: a wrong type fails in milliseconds
    model = build_sam_from_config(MODEL_CONFIGS[model_type])
    if state is not None:
        load_state_dict_strict(model, state, model_type)
    return model


def build_sam_vit_h(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM with the ViT-H image encoder (official ``sam_vit_h_4b8939.pth``)."""
    return build_sam_type("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM with the ViT-L image encoder (official ``sam_vit_l_0b3195.pth``)."""
    return build_sam_type("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: Optional[PathLike] = None) -> Sam:
    """SAM with the ViT-B image encoder (official ``sam_vit_b_01ec64.pth``)."""
    return build_sam_type("vit_b", checkpoint)


def build_sam_vit_small(checkpoint: Optional[PathLike] = None) -> Sam:
    """The project's small SAM (256 px input, 6-block 192-wide encoder, 128-wide decoder).

    Without ``checkpoint`` the weights are random; ``napari_sam.build_sam("vit_small")``
    loads the trained weights shipped in the package.
    """
    return build_sam_type("vit_small", checkpoint)


def build_sam_vit_test(checkpoint: Optional[PathLike] = None) -> Sam:
    """Small SAM for tests: 64-wide, 2-block encoder (one windowed, one global), full decoder."""
    return build_sam_type("vit_test", checkpoint)


sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_test": build_sam_vit_test,
    "vit_small": build_sam_vit_small,
}

__all__: list[Any] = [
    "CheckpointError",
    "MODEL_CONFIGS",
    "build_sam_type",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_small",
    "build_sam_vit_test",
    "detect_model_type",
    "read_state_dict",
    "sam_model_registry",
]
