"""Shared by the benchmark scripts: random weights both implementations load, images, timing."""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"  # the test photos (truck.jpg, groceries.jpg; NOTICE there)


def load_rgb(name: str) -> np.ndarray:
    """HxWx3 uint8 RGB of the photo ``name`` in tests/data/images."""
    from PIL import Image

    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


def make_random_checkpoint(model_type: str, path: os.PathLike, seed: int = 0) -> Path:
    """Write random weights for ``model_type`` that both SAMs load; returns ``path``.

    The same tensors as the tests' random checkpoints: constructor weights drawn after
    ``torch.manual_seed(seed)``, then relative-position tables, position embedding, norms
    and biases randomised too, and the hypernetwork outputs scaled so logits leave [-1, 1].
    """
    import torch

    from napari_sam.build import MODEL_CONFIGS, build_sam_from_config

    torch.manual_seed(seed)
    state = build_sam_from_config(MODEL_CONFIGS[model_type]).state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    for name, tensor in state.items():
        if name.endswith(("rel_pos_h", "rel_pos_w")):
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("pos_embed"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif tensor.ndim == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name):
            scale = 0.2 if name.endswith("weight") else 0.1
            tensor.copy_(float(name.endswith("weight")) + scale * torch.randn(tensor.shape, generator=generator))
        elif name.endswith("bias"):
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    for i in range(4):
        state[f"mask_decoder.output_hypernetworks_mlps.{i}.layers.2.weight"].mul_(8.0)
    torch.save(state, path)
    return Path(path)


def reference_model(model_type: str, checkpoint: Path):
    """The reference ``segment_anything`` model of ``model_type`` loaded from ``checkpoint``."""
    import segment_anything
    from segment_anything.build_sam import _build_sam

    if model_type in segment_anything.sam_model_registry:
        return segment_anything.sam_model_registry[model_type](checkpoint=str(checkpoint))
    from napari_sam.build import MODEL_CONFIGS  # the small test configuration, built by the reference

    config = MODEL_CONFIGS[model_type]
    return _build_sam(config.embed_dim, config.depth, config.num_heads, list(config.global_attn_indexes),
                      checkpoint=str(checkpoint))


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


__all__ = ["ROOT", "IMAGES", "load_rgb", "make_random_checkpoint", "reference_model", "timed", "median", "peak_rss_mb",
           "write_json_atomically"]
