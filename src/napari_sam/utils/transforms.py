"""Resize images and prompts so that the long side becomes the model's input size.

Same sizes and pixels as the reference's ``ResizeLongestSide``: the new size is
``int(side * scale + 0.5)`` (at least 1) with ``scale = target / long_side`` in Python floats, images
are resized with PIL's bilinear filter (antialiased when shrinking), and coordinates are
scaled separately in x and y by the ratio of the rounded to the original size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ResizeLongestSide:
    """Resize to a long side of ``target_length`` pixels (1024 for SAM).

    Coordinates are (x, y) pixels; boxes are XYXY. Inputs are in the original image frame
    and outputs in the resized frame.
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) after resizing so that max(H, W) == long_side_length, rounded half up.

        A side that would round to 0 (an image thinner than half a pixel after resizing,
        e.g. 1 x 5000) is kept at 1 pixel; the reference gives 0 there and fails to resize.
        """
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """Resize an HxWxC (C = 1 or 3) or HxW uint8 image with PIL bilinear; returns uint8."""
        if image.dtype != np.uint8:
            raise TypeError(f"apply_image expects a uint8 image, got {image.dtype}.")
        newh, neww = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        squeeze = image.ndim == 3 and image.shape[2] == 1
        pil = Image.fromarray(image[..., 0] if squeeze else image)
        resized = np.array(pil.resize((neww, newh), Image.BILINEAR))
        return resized[..., None] if squeeze else resized

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """Scale ...x2 (x, y) coordinates from the original to the resized frame (float64 copy)."""
        oldh, oldw = original_size
        newh, neww = self.get_preprocess_shape(oldh, oldw, self.target_length)
        out = np.array(coords, dtype=float, copy=True)
        out[..., 0] = out[..., 0] * (neww / oldw)
        out[..., 1] = out[..., 1] * (newh / oldh)
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """Scale Bx4 XYXY boxes from the original to the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a BxCxHxW float tensor (bilinear, antialiased; may differ from apply_image).

        The output size comes from H and W; the reference reads it from the batch and
        channel sizes (``shape[0], shape[1]``), which gives wrong sizes.
        """
        target = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, target, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """Torch version of :meth:`apply_coords`; returns a float32 copy."""
        oldh, oldw = original_size
        newh, neww = self.get_preprocess_shape(oldh, oldw, self.target_length)
        out = coords.detach().clone().to(torch.float32)
        out[..., 0] = out[..., 0] * (neww / oldw)
        out[..., 1] = out[..., 1] * (newh / oldh)
        return out

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """Torch version of :meth:`apply_boxes`; returns float32 Bx4."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
