"""Painting masks into label images: one overlap rule for the whole package."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def paint_masks(
    masks: Sequence[np.ndarray],
    shape: tuple[int, int],
    ids: Optional[Sequence[int]] = None,
    dtype: Any = np.uint32,
    areas: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Paint HxW boolean masks into a new HxW label image.

    Overlap rule (the same for interactive objects, commits and automatic masks): where masks
    overlap, the **smaller mask stays visible**: masks are painted in order of decreasing
    area, and of two masks of equal area the later one is painted last. So an object inside
    another (a nucleus in a cell) is never hidden by it.

    Args:
        masks: HxW arrays, nonzero = inside.
        shape: (H, W) of the label image.
        ids: the label of each mask; default 1..K in order.
        dtype: integer dtype of the label image.
        areas: the masks' pixel counts when already known (e.g. AMG records' ``area``);
            counted here otherwise.

    Returns:
        HxW label image, 0 where no mask is.

    Raises:
        ValueError: a mask of another shape, or as many ids as masks not given.
    """
    labels = np.zeros(shape, dtype=dtype)
    ids = list(range(1, len(masks) + 1)) if ids is None else list(ids)
    if len(ids) != len(masks) or (areas is not None and len(areas) != len(masks)):
        raise ValueError(f"Got {len(masks)} masks but {len(ids)} ids" + (
            f" and {len(areas)} areas." if areas is not None else "."))
    arrays = [np.asarray(mask, dtype=bool) for mask in masks]
    for array in arrays:
        if array.shape != tuple(shape):
            raise ValueError(f"Mask of shape {array.shape} does not match the label image shape {tuple(shape)}.")
    areas = [int(array.sum()) for array in arrays] if areas is None else [int(a) for a in areas]
    for index in sorted(range(len(arrays)), key=lambda i: -areas[i]):  # stable: equal areas keep their order
        labels[arrays[index]] = ids[index]
    return labels
