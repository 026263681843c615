"""napari reader and writer for label images as COCO RLE JSON (thin adapters over napari_sam.io)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..io import coco_to_labels, is_coco_labels, load_json, write_coco_json


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Labels layer to ``path`` (.json) as COCO instances with RLE masks.

    The layer's ``scale`` and ``translate`` are stored too, so reading the file back
    places the labels where they were.
    """
    import numpy as np

    extra = {key: [float(v) for v in meta[key]] for key in ("scale", "translate") if meta.get(key) is not None}
    if meta.get("name"):
        extra["name"] = str(meta["name"])
    write_coco_json(path, np.asarray(data), extra=extra)
    return [path]


def get_reader(path: Union[str, list[str]]) -> Optional[Callable[[Any], list]]:
    """Return a reader for COCO/AMG RLE .json files, or None for anything else."""
    if isinstance(path, list) or not str(path).lower().endswith(".json"):
        return None
    try:
        data = load_json(path)
    except (OSError, ValueError):
        return None
    if not is_coco_labels(data):
        return None

    def read(_: Any) -> list[tuple[Any, dict[str, Any], str]]:
        labels = coco_to_labels(data)
        meta = data.get("napari_sam", {}) if isinstance(data, dict) else {}
        kwargs: dict[str, Any] = {"name": meta.get("name", Path(path).stem)}
        for key in ("scale", "translate"):
            if key in meta and len(meta[key]) == labels.ndim:
                kwargs[key] = meta[key]
        return [(labels, kwargs, "labels")]

    return read
