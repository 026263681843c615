"""Helpers of automatic mask generation: point grids, crop boxes, scores, boxes, RLE, NMS.

Conventions (as the reference ``segment_anything.utils.amg``):

* points are (x, y) pixels; grids are normalised to [0, 1] and scaled by (crop width,
  crop height);
* boxes are XYXY with *inclusive* pixel indices (x_max is the last foreground column), int64;
  an empty mask has the box [0, 0, 0, 0]; records report XYWH as (x0, y0, x1 - x0, y1 - y0);
* crop boxes are XYXY with exclusive ends ``[x0, y0, x1, y1]`` (image[y0:y1, x0:x1]);
* masks travel in batches as :class:`MaskData` (dict-like: one key per field, all fields
  filtered and concatenated together);
* uncompressed RLE is ``{"size": [h, w], "counts": [...]}`` over the column-major (Fortran)
  flattened mask, starting with the length of the first run of zeros (0 if the first
  pixel is set); COCO RLE is pycocotools' compressed form with ``counts`` as a str.
"""

from __future__ import annotations

import math
from copy import deepcopy
from itertools import product
from typing import Any, Generator, ItemsView, Sequence, TypeVar, Union

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "crop_box_scores",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "mask_to_rle_pytorch",
    "nms_keep",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]

_Field = Union[list, np.ndarray, torch.Tensor]
_FIELD_TYPES = (list, np.ndarray, torch.Tensor)
_Box = TypeVar("_Box", list, np.ndarray, torch.Tensor)


# -- batches of masks ------------------------------------------------------------------------


def _check_field(key: str, value: Any) -> None:
    if not isinstance(value, _FIELD_TYPES):
        raise TypeError(f"MaskData field {key!r} must be a list, numpy array or torch tensor, not {type(value).__name__}.")


def _join(first: _Field, second: _Field) -> _Field:
    """``first`` followed by ``second`` along the first axis, in the type of ``second``."""
    if isinstance(second, torch.Tensor):
        return torch.cat([first, second], dim=0)
    if isinstance(second, np.ndarray):
        return np.concatenate([first, second], axis=0)
    if isinstance(second, list):
        return list(first) + second
    raise TypeError(f"MaskData cannot concatenate a {type(second).__name__}.")


class MaskData:
    """Per-mask fields of a batch of masks, kept row-aligned (the reference's ``MaskData``).

    A small mapping from field name (``"masks"``, ``"rles"``, ``"boxes"``, ``"iou_preds"``,
    ``"points"``, ``"stability_score"``, ``"crop_boxes"``, ... any name works) to a list,
    numpy array or torch tensor whose first axis indexes the masks. :meth:`filter` and
    :meth:`cat` act on every field at once, so the fields stay aligned. Both change the
    object in place and return None, as in the reference.

    Args:
        **kwargs: the initial fields.

    Raises:
        TypeError: a field that is not a list, numpy array or torch tensor (the reference
            asserts instead).
    """

    def __init__(self, **kwargs: _Field) -> None:
        for key, value in kwargs.items():
            _check_field(key, value)
        self._stats: dict[str, Any] = dict(kwargs)

    def __setitem__(self, key: str, item: _Field) -> None:
        _check_field(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        """(field name, value) pairs, as ``dict.items``."""
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` of every field, in place.

        Args:
            keep: a boolean tensor with one entry per row, or int64 row indices (rows come
                out in the order of the indices; repeats are allowed). A field set to None
                stays None.

        Raises:
            TypeError: a field of another type.
        """
        keep_np = None
        for key, value in self._stats.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                self._stats[key] = value[torch.as_tensor(keep, device=value.device)]
            elif isinstance(value, np.ndarray):
                keep_np = keep.detach().cpu().numpy() if keep_np is None else keep_np
                self._stats[key] = value[keep_np]
            elif isinstance(value, list):
                if keep.dtype == torch.bool:
                    self._stats[key] = [item for item, flag in zip(value, keep.tolist()) if flag]
                else:
                    self._stats[key] = [value[i] for i in keep.tolist()]
            else:
                raise TypeError(f"MaskData field {key!r} has an unsupported type {type(value).__name__}.")

    def cat(self, new_stats: "MaskData") -> None:
        """Append the rows of ``new_stats`` to this one's, field by field, in place.

        Fields missing here (or None) are taken over as deep copies; list fields are
        deep-copied too, so later changes to ``new_stats`` do not reach this object.

        Raises:
            TypeError: a field of another type.
        """
        for key, value in new_stats.items():
            current = self._stats.get(key)
            if current is None:
                self._stats[key] = deepcopy(value)
            else:
                self._stats[key] = _join(current, deepcopy(value) if isinstance(value, list) else value)

    def to_numpy(self) -> None:
        """Move every tensor field to the CPU as a numpy array, in place."""
        for key, value in self._stats.items():
            if isinstance(value, torch.Tensor):
                self._stats[key] = value.detach().cpu().numpy()


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Generator[list[Any], None, None]:
    """Walk several equally long sequences in step, ``batch_size`` rows at a time.

    Args:
        batch_size: rows per batch (the last batch may be shorter).
        *args: lists, arrays or tensors of equal length.

    Yields:
        One list per batch holding the slice ``[start:start + batch_size]`` of each argument.

    Raises:
        ValueError: no sequences, or sequences of different lengths (the reference asserts).
    """
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs one or more sequences, all of the same length.")
    for start in range(0, len(args[0]), batch_size):
        yield [a[start : start + batch_size] for a in args]


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


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold + offset`` and ``- offset`` (float32).

    The high-threshold mask lies inside the low one, so the IoU is a ratio of pixel counts
    (SAM paper, Sec. 4 "stability"; the reference's ``calculate_stability_score``). 0/0 gives
    NaN, as in the reference.

    Args:
        masks: ...xHxW float mask logits (full resolution of the crop).
        mask_threshold: the model's threshold (0.0).
        threshold_offset: the threshold shift (1.0 in the automatic mask generator).

    Returns:
        float32 tensor of shape ``masks.shape[:-2]``.
    """
    high = (masks > (mask_threshold + threshold_offset)).flatten(-2).sum(-1, dtype=torch.int32)
    low = (masks > (mask_threshold - threshold_offset)).flatten(-2).sum(-1, dtype=torch.int32)
    return high / low


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive XYXY boxes around boolean masks; [0, 0, 0, 0] for an empty mask.

    Args:
        masks: ...xHxW bool (any leading shape, also a single HxW mask).

    Returns:
        ...x4 int64 (x_min, y_min, x_max, y_max), x_max/y_max the last foreground
        column/row. int64 also for an input without elements (the reference returns
        float32 zeros there).
    """
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
    uncropped = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(uncropped, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(uncropped, image[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


def box_xyxy_to_xywh(box_xyxy: _Box) -> _Box:
    """One XYXY box -> XYWH ``(x0, y0, x1 - x0, y1 - y0)``, in the type it came in.

    Args:
        box_xyxy: a 4-element tensor, numpy array or list (x0, y0, x1, y1).

    Returns:
        A new object of the same type and dtype (a tensor for a tensor, as the reference;
        call ``.tolist()`` for JSON). The input is not changed.
    """
    x0, y0, x1, y1 = box_xyxy[0], box_xyxy[1], box_xyxy[2], box_xyxy[3]
    box_xywh = deepcopy(box_xyxy)
    box_xywh[2] = x1 - x0
    box_xywh[3] = y1 - y0
    return box_xywh


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Move XYXY boxes from a crop's frame to the image's (add the crop's x0, y0).

    Args:
        boxes: Kx4 or BxKx4 XYXY boxes in the crop frame.
        crop_box: XYXY crop box in the image frame.

    Returns:
        Boxes of the same shape in the image frame (dtype by torch's promotion with int64).
    """
    x0, y0 = crop_box[0], crop_box[1]
    shift = torch.tensor([x0, y0, x0, y0], device=boxes.device)
    return boxes + shift


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """Move (x, y) points from a crop's frame to the image's.

    Args:
        points: Kx2 or BxKx2 (x, y) points in the crop frame.
        crop_box: XYXY crop box in the image frame.

    Returns:
        Points of the same shape in the image frame.
    """
    shift = torch.tensor([crop_box[0], crop_box[1]], device=points.device)
    return points + shift


def uncrop_masks(masks: torch.Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Place masks of a crop into zero-filled masks of the whole image.

    Args:
        masks: ...xhxw masks of the crop (h = y1 - y0, w = x1 - x0).
        crop_box: XYXY crop box (exclusive ends) in the image frame.
        orig_h, orig_w: image size.

    Returns:
        ...x orig_h x orig_w masks; the input itself when the crop is the whole image.
    """
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    # F.pad takes (left, right, top, bottom) for the last two axes.
    return torch.nn.functional.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


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


def mask_to_rle_pytorch(tensor: torch.Tensor) -> list[dict[str, Any]]:
    """Uncompressed RLE (pycocotools' layout) of KxHxW boolean masks: :func:`mask_to_rle` in
    the masks' own frame, the reference's name and signature."""
    return mask_to_rle(tensor)


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


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed -> COCO compressed RLE (pycocotools), ``counts`` decoded to str for JSON."""
    from pycocotools import mask as mask_utils

    height, width = uncompressed_rle["size"]
    encoded = mask_utils.frPyObjects(uncompressed_rle, height, width)
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
