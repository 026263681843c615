"""Prompt simulation from ground-truth masks, after SAM's training recipe.

Kirillov et al. 2023, "Segment Anything", appendix A ("Training algorithm"): the first
prompt of an object is, with equal probability, a positive point drawn uniformly from the
ground-truth mask or its bounding box with noise (standard deviation 10 % of the box side,
at most 20 px at 1024 px input; scaled to the model's input size here); each later point
is drawn uniformly from the error region between the previous prediction and the ground
truth (positive where the prediction missed the object, negative where it spilled over),
and the previous low-res logits are passed as the mask prompt.

All coordinates are (x, y) in the model's input frame (after ``ResizeLongestSide``), in
pixel units, as ``SamPredictor.predict_torch`` takes them. Masks are KxHxW bool tensors
in the same frame.
"""

from __future__ import annotations

import torch

# SAM's box noise: std = 10 % of the side, clipped to 20 px at 1024 px input.
BOX_NOISE_FRACTION = 0.1
BOX_NOISE_MAX_AT_1024 = 20.0


def sample_points_in(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One point drawn uniformly from each mask.

    Args:
        masks: KxHxW bool; a mask with no pixel yields the image centre.
        generator: torch random generator.

    Returns:
        Kx2 float32 (x, y) pixel coordinates.
    """
    count, height, width = masks.shape
    flat = masks.reshape(count, -1)
    empty = ~flat.any(1)
    flat = torch.where(empty[:, None], True, flat)  # an empty mask draws from the whole image
    running = flat.cumsum(1, dtype=torch.int32)  # running[i, j]: pixels of mask i up to index j
    sizes = running[:, -1]
    # the k-th pixel of each mask, k uniform in 0..size-1: the first index whose running count exceeds k
    k = (torch.rand(count, generator=generator) * sizes).long().clamp(max=sizes.long() - 1)
    index = torch.searchsorted(running, (k + 1).to(torch.int32).unsqueeze(1)).squeeze(1)
    points = torch.stack([(index % width).float(), torch.div(index, width, rounding_mode="floor").float()], 1)
    points[empty] = torch.tensor([width / 2, height / 2])
    return points


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive pixel indices) of KxHxW bool masks; empty masks give zeros."""
    count, height, width = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, ys, height).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values
    x0 = torch.where(cols, xs, width).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0.0
    return boxes


def noisy_boxes(masks: torch.Tensor, generator: torch.Generator, input_size: int) -> torch.Tensor:
    """Bounding boxes with SAM's coordinate noise.

    Args:
        masks: KxHxW bool ground truth.
        generator: torch random generator.
        input_size: side of the model input in pixels (scales the 20 px noise cap).

    Returns:
        Kx4 float32 XYXY boxes, clipped to the image and never inverted.
    """
    boxes = mask_boxes(masks)
    height, width = masks.shape[1:]
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).repeat(1, 2) + 1
    cap = BOX_NOISE_MAX_AT_1024 * input_size / 1024
    noise = torch.randn(boxes.shape, generator=generator) * (BOX_NOISE_FRACTION * side).clamp(max=cap)
    noisy = boxes + noise
    limit = torch.tensor([width - 1, height - 1, width - 1, height - 1], dtype=torch.float32)
    noisy = torch.minimum(noisy.clamp(min=0), limit)
    x0, x1 = torch.minimum(noisy[:, 0], noisy[:, 2]), torch.maximum(noisy[:, 0], noisy[:, 2])
    y0, y1 = torch.minimum(noisy[:, 1], noisy[:, 3]), torch.maximum(noisy[:, 1], noisy[:, 3])
    return torch.stack([x0, y0, x1, y1], 1)


def corrective_points(
    predicted: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per object, drawn uniformly from the error region.

    Args:
        predicted: KxHxW bool previous prediction (thresholded at 0 and resized to the
            input frame).
        target: KxHxW bool ground truth.
        generator: torch random generator.

    Returns:
        (Kx2 float32 (x, y) points, K float32 labels: 1 where the point lies on a missed
        part of the object, 0 where it lies on a false-positive part). Where the
        prediction is perfect, the point is a positive point inside the object.
    """
    error = predicted ^ target
    perfect = ~error.flatten(1).any(1)
    error[perfect] = target[perfect]
    points = sample_points_in(error, generator)
    x = points[:, 0].long().clamp(0, target.shape[2] - 1)
    y = points[:, 1].long().clamp(0, target.shape[1] - 1)
    labels = target[torch.arange(len(target)), y, x].float()
    return points, labels
