"""Helpers of automatic mask generation: point grids, crop boxes, scores, boxes, RLE, NMS.

Conventions (as the reference ``segment_anything.utils.amg``):

* points are (x, y) pixels; grids are normalised to [0, 1] and scaled by (crop width,
  crop height);
* boxes are XYXY with *inclusive* pixel indices (x_max is the last foreground column), int64;
  an empty mask has the box [0, 0, 0, 0]; records report XYWH as (x0, y0, x1 - x0, y1 - y0);
* crop boxes are XYXY with exclusive ends ``[x0, y0, x1, y1]`` (image[y0:y1, x0:x1]);
* uncompressed RLE is ``{"size": [h, w], "counts": [...]}`` over the column-major (Fortran)
  flattened mask, starting with the length of the first run of zeros (0 if the first
  pixel is set); COCO RLE is pycocotools' compressed form with ``counts`` as a str.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

__all__ = [
    "area_from_rle",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "nms_keep",
    "remove_small_regions",
    "rle_to_mask",
]


# -- grids and crops -----------------------------------------------------------------------


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n)x2 float64 (x, y) points in [0, 1], cell centres of an n x n grid, x fastest."""
    if n_per_side < 1:
        raise ValueError(f"points per side must be >= 1, got {n_per_side}.")
    half_step = 1 / (2 * n_per_side)
    axis = np.linspace(half_step, 1 - half_step, n_per_side)
    xs, ys = np.meshgrid(axis, axis)  # rows vary y, columns vary x
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has ``int(n_per_side / scale_per_layer**i)`` points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Sequence[int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of all layers, the reference's layout and rounding.

    Layer 0 is the whole image. Layer i >= 1 has 2**i x 2**i crops overlapping by
    ``int(overlap_ratio * short_side * 2 / 2**i)`` pixels, each ``ceil((overlap*(k-1) + side) / k)``
    long, starting at ``int((len - overlap) * j)``, clipped to the image; x is the outer loop.

    Args:
        im_size: (H, W) of the image.
        n_layers: number of crop layers beyond the full image.
        overlap_ratio: overlap of neighbouring first-layer crops, as a fraction of the short side.

    Returns:
        (XYXY crop boxes, exclusive ends; their layer indices).
    """
    im_h, im_w = int(im_size[0]), int(im_size[1])
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n_crops = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = int(math.ceil((overlap * (n_crops - 1) + im_w) / n_crops))
        crop_h = int(math.ceil((overlap * (n_crops - 1) + im_h) / n_crops))
        starts_x = [int((crop_w - overlap) * j) for j in range(n_crops)]
        starts_y = [int((crop_h - overlap) * j) for j in range(n_crops)]
        for x0, y0 in product(starts_x, starts_y):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


# -- scores and boxes ----------------------------------------------------------------------


def calculate_stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold + offset`` and ``- offset`` (float32).

    The high-threshold mask lies inside the low one, so the IoU is a ratio of pixel counts
    (SAM paper, Sec. 4 "stability"; the reference's ``calculate_stability_score``). 0/0 gives
    NaN, as in the reference.

    Args:
        logits: ...xHxW float mask logits (full resolution of the crop).
        mask_threshold: the model's threshold (0.0).
        offset: the threshold shift (1.0 by default).

    Returns:
        float32 tensor of shape ``logits.shape[:-2]``.
    """
    high = (logits > (mask_threshold + offset)).flatten(-2).sum(-1, dtype=torch.int32)
    low = (logits > (mask_threshold - offset)).flatten(-2).sum(-1, dtype=torch.int32)
    return high / low


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY boxes (int64) around ...xHxW boolean masks; [0, 0, 0, 0] when empty."""
    height, width = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros((*masks.shape[:-2], 4), dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=-1)  # ... x H
    cols = masks.any(dim=-2)  # ... x W

    def first_last(flags: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(size, device=flags.device)
        first = torch.where(flags, index, size).amin(dim=-1)
        last = torch.where(flags, index, -1).amax(dim=-1)
        return first, last

    top, bottom = first_last(rows, height)
    left, right = first_last(cols, width)
    boxes = torch.stack([left, top, right, bottom], dim=-1).to(torch.int64)
    empty = ~rows.any(dim=-1)
    return boxes.masked_fill(empty.unsqueeze(-1), 0)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """True for boxes within ``atol`` px of a crop edge that is not also an image edge.

    Args:
        boxes: Kx4 XYXY boxes in the crop frame.
        crop_box: XYXY crop box in the image frame.
        orig_box: XYXY box of the whole image, [0, 0, W, H].
        atol: distance in pixels (20 in the reference).

    Returns:
        K booleans.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    offset = torch.as_tensor([crop_box[0], crop_box[1], crop_box[0], crop_box[1]], device=boxes.device)
    uncropped = (boxes + offset).float()
    near_crop = torch.isclose(uncropped, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(uncropped, image[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def box_xyxy_to_xywh(box: Sequence[int] | np.ndarray | torch.Tensor) -> list:
    """XYXY -> [x0, y0, x1 - x0, y1 - y0] as a list of Python numbers."""
    x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by torchvision's NMS (all boxes one class), in its output order.

    Same call as the reference (``batched_nms`` with zero class ids), so ties are ordered
    the same way (its sort is not stable).
    """
    return batched_nms(
        boxes.float(), scores, torch.zeros(len(boxes), device=boxes.device), iou_threshold=iou_threshold
    )


def crop_box_scores(crop_boxes: torch.Tensor) -> torch.Tensor:
    """1 / area of Kx4 XYXY crop boxes: cross-crop NMS prefers masks from smaller crops."""
    return 1 / box_area(crop_boxes)


# -- run-length encoding ---------------------------------------------------------------------


def mask_to_rle(
    masks: torch.Tensor, offset: Sequence[int] = (0, 0), size: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Uncompressed RLE of KxHxW boolean masks, optionally placed inside a larger image.

    Equivalent to padding each mask with zeros to ``size`` at ``offset`` and encoding it as
    the reference's ``mask_to_rle_pytorch`` does, without building the padded masks.

    Args:
        masks: KxHxW bool masks (crop frame).
        offset: (x0, y0) of the crop's top-left corner in the image.
        size: (H_img, W_img) of the image; default the masks' own size.

    Returns:
        K dicts ``{"size": [H_img, W_img], "counts": [int, ...]}``.
    """
    n_masks, height, width = masks.shape
    img_h, img_w = (height, width) if size is None else (int(size[0]), int(size[1]))
    x0, y0 = int(offset[0]), int(offset[1])
    total = img_h * img_w
    if n_masks == 0:
        return []
    # Column-major with one zero above and below every column: runs never cross columns.
    columns = masks.transpose(1, 2)
    padded = torch.zeros((n_masks, width, height + 2), dtype=torch.bool, device=masks.device)
    padded[:, :, 1:-1] = columns
    changes = (padded[:, :, 1:] != padded[:, :, :-1]).nonzero()  # rows (mask, column, row)
    flat = (changes[:, 1] + x0) * img_h + (changes[:, 2] + y0)  # run boundaries in the image
    per_mask = torch.bincount(changes[:, 0], minlength=n_masks).tolist()
    flat = flat.cpu().numpy()
    out = []
    start = 0
    for count in per_mask:
        bounds = flat[start : start + count]
        start += count
        if len(bounds) > 2:
            # An end of one column followed by a start at the same index (a column touching the
            # bottom edge, the next the top edge) is no boundary in the image.
            ends, starts = bounds[1:-1:2], bounds[2::2]
            joined = ends == starts
            if joined.any():
                drop = np.zeros(len(bounds), dtype=bool)
                where = np.nonzero(joined)[0]
                drop[2 * where + 1] = True
                drop[2 * where + 2] = True
                bounds = bounds[~drop]
        tail = np.zeros(0, dtype=np.int64) if len(bounds) and bounds[-1] == total else np.array([total])
        points = np.concatenate((np.zeros(1, dtype=np.int64), bounds, tail))
        out.append({"size": [img_h, img_w], "counts": np.diff(points).astype(np.int64).tolist()})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """HxW bool mask (C-contiguous) from an uncompressed RLE."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != height * width:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {height}*{width}.")
    return np.ascontiguousarray(flat.reshape(width, height).T)


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed -> COCO compressed RLE (pycocotools), ``counts`` decoded to str for JSON."""
    from pycocotools import mask as mask_utils

    height, width = rle["size"]
    encoded = mask_utils.frPyObjects(rle, height, width)
    encoded["counts"] = encoded["counts"].decode("utf-8")
    return encoded


# -- small-region clean-up ---------------------------------------------------------------


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill small holes or remove small islands of a boolean mask (8-connectivity).

    The reference's ``remove_small_regions`` (OpenCV connected components), with
    scikit-image: "holes" fills every connected component of the background smaller than
    ``area_thresh`` (border-touching ones included); "islands" removes every foreground
    component smaller than ``area_thresh``, keeping the largest if all are small.

    Args:
        mask: HxW bool.
        area_thresh: components with fewer pixels are small.
        mode: "holes" or "islands".

    Returns:
        (the new mask, whether it changed).

    Raises:
        ValueError: unknown mode.
    """
    from skimage.measure import label

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    fill_holes = mode == "holes"
    working = ~mask if fill_holes else mask
    labels, n_components = label(working, connectivity=2, return_num=True)
    sizes = np.bincount(labels.ravel(), minlength=n_components + 1)[1:]
    small = np.nonzero(sizes < area_thresh)[0] + 1
    if len(small) == 0:
        return mask, False
    if fill_holes:
        return mask | np.isin(labels, small), True
    big = np.nonzero(sizes >= area_thresh)[0] + 1
    if len(big) == 0:
        big = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, big), True
