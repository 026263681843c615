"""Shared by the benchmark scripts: random weights both implementations load, images, timing."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import load_rgb, make_random_checkpoint  # noqa: E402  (test helpers, not part of src/)


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


__all__ = ["ROOT", "load_rgb", "make_random_checkpoint", "reference_model", "timed", "median", "peak_rss_mb",
           "write_json_atomically"]
