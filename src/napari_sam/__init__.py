"""napari-sam: Segment Anything for napari, with a checkpoint-compatible PyTorch SAM.

The public API is exported lazily (PEP 562), so ``import napari_sam`` imports neither torch
nor Qt; ``from napari_sam import SamPredictor`` imports torch on first use. Any public module
may be imported after a napari viewer is shown (:mod:`napari_sam._triton`).

Same names as the reference ``segment_anything`` package::

    from napari_sam import sam_model_registry, SamPredictor, SamAutomaticMaskGenerator
    from napari_sam.utils.transforms import ResizeLongestSide
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _triton

# Before any submodule (hence torch / torchvision) is imported, now or later: importing triton
# after napari's OpenGL window exists would crash the process (see napari_sam._triton).
_triton.install()

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it ([tool.hatch.version])

_EXPORTS = {
    "sam_model_registry": "napari_sam.build",
    "build_sam_vit_h": "napari_sam.build",
    "build_sam_vit_l": "napari_sam.build",
    "build_sam_vit_b": "napari_sam.build",
    "build_sam_vit_test": "napari_sam.build",
    "build_sam_vit_small": "napari_sam.build",
    "detect_model_type": "napari_sam.build",
    "CheckpointError": "napari_sam.build",
    "build_sam": "napari_sam.checkpoints",
    "resolve_checkpoint": "napari_sam.checkpoints",
    "fetch_weights": "napari_sam.checkpoints",
    "get_cache_dir": "napari_sam.checkpoints",
    "KNOWN_WEIGHTS": "napari_sam.checkpoints",
    "DownloadError": "napari_sam.checkpoints",
    "HashMismatchError": "napari_sam.checkpoints",
    "SamPredictor": "napari_sam.predictor",
    "SamAutomaticMaskGenerator": "napari_sam.automatic_mask_generator",
    "AmgSettings": "napari_sam.amg_settings",
    "to_rgb_uint8": "napari_sam.utils.image",
    "segment": "napari_sam._napari.api",
    "segment_volume": "napari_sam.volume",
    "segment_volume_automatic": "napari_sam.volume",
    "TileGrid": "napari_sam.tiling",
    "TiledPredictor": "napari_sam.tiled_predictor",
    "TiledAutomaticMaskGenerator": "napari_sam.tiled_amg",
    "EmbeddingStore": "napari_sam.embedding_store",
    "StoreMismatchError": "napari_sam.embedding_store",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
