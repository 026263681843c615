"""Shared fixtures: random-weight checkpoints that both implementations load, real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

IMAGES = Path(__file__).resolve().parent / "data" / "images"


def load_rgb(name: str) -> np.ndarray:
    """A real RGB uint8 photo from tests/data/images (truck.jpg, groceries.jpg; see NOTICE there)."""
    from PIL import Image

    path = IMAGES / name
    if not path.exists():
        pytest.fail(f"Test image {path} is missing from the repository (see tests/data/images/NOTICE).")
    return np.asarray(Image.open(path).convert("RGB"))


def reference_sam(config):
    """The reference's own classes, constructed with the sizes of a ``napari_sam.build.SamConfig``.

    For vit_b/l/h this is what the reference's ``sam_model_registry`` builds; for the small
    types it shows that the reference's classes load our checkpoints unchanged.
    """
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = config.img_size // config.patch_size
    encoder = ImageEncoderViT(
        depth=config.depth, embed_dim=config.embed_dim, img_size=config.img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config.num_heads,
        patch_size=config.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=list(config.global_attn_indexes), window_size=config.window_size,
        out_chans=config.prompt_embed_dim,
    )
    prompts = PromptEncoder(
        embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
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
    return Sam(encoder, prompts, decoder, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]).eval()


def make_random_checkpoint(model_type: str, path: os.PathLike, seed: int = 0) -> Path:
    """Write a random-weight state dict for ``model_type`` that both SAMs load.

    Built with the reference's builder (so the state dict is the reference's own), then
    every tensor that the reference initialises to a constant (relative-position tables,
    absolute position embedding, norms, biases) is randomised too, so the test exercises
    every term. Decoder output scales are raised so logits leave [-1, 1].
    """
    import torch

    from napari_sam.build import MODEL_CONFIGS

    config = MODEL_CONFIGS[model_type]
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = reference_sam(config)
    generator = torch.Generator().manual_seed(seed + 1)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("rel_pos_h", "rel_pos_w")):
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("pos_embed"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif tensor.ndim == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name):
            if name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("bias"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    # Larger hypernetwork outputs: mask logits of a few units, like a trained model's.
    for i in range(4):
        state[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.2.weight"].mul_(8.0)
    torch.save(state, path)
    return Path(path)


@pytest.fixture(scope="session")
def reference_builder():
    """:func:`reference_sam` for test modules (``from conftest import`` is ambiguous with tests/gui/conftest.py)."""
    return reference_sam


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Return a function model_type -> path of a cached random-weight checkpoint."""
    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("checkpoints")

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = make_random_checkpoint(model_type, folder / f"random_{model_type}.pth")
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def sam():
    """The bundled, trained ``vit_small`` on the CPU (input 256 px), built once for the session;
    tests must not change its weights (build another for that)."""
    from napari_sam import build_sam

    return build_sam("vit_small", device="cpu")


@pytest.fixture(scope="session")
def truck() -> np.ndarray:
    return load_rgb("truck.jpg")


@pytest.fixture(scope="session")
def groceries() -> np.ndarray:
    return load_rgb("groceries.jpg")
