"""Convert the images scientists have into the RGB uint8 image SAM was trained on.

One documented conversion serves ``SamPredictor.set_image``, the automatic mask generator,
the command line and the napari plugin (the reference accepts only HxWx3 uint8; its
issues #123, #413, #642):

* layout: HxW (grayscale) and HxWx1 are replicated to three channels; HxWx3 is kept;
  HxWx4 (RGBA) drops the alpha channel. Anything else raises ``ValueError``.
* values: uint8 is used as is (no rescaling, so RGB photos give exactly the reference's
  input). Other dtypes (uint16, int, float, bool) are mapped linearly from
  ``contrast_limits = (low, high)`` to [0, 255], clipped and rounded; without contrast
  limits, ``low`` and ``high`` are the 0.5th and 99.5th percentiles of all finite pixel
  values (all channels together, so colour balance is kept). NaN maps to 0; a constant
  image maps to 0. Boolean images map to 0 / 255.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

ROBUST_PERCENTILES = (0.5, 99.5)


def to_rgb_uint8(
    image: np.ndarray,
    contrast_limits: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """Convert an image to HxWx3 uint8 RGB as described in the module docstring.

    Args:
        image: HxW, HxWx1, HxWx3 or HxWx4 array of any real dtype (channels last).
        contrast_limits: (low, high) intensities mapped to 0 and 255 for non-uint8 input
            (e.g. a napari layer's contrast limits). Ignored for uint8 input.

    Returns:
        HxWx3 uint8 array, C-contiguous. uint8 RGB input is returned unchanged (no copy).

    Raises:
        ValueError: wrong number of dimensions or channels, empty image, or low >= high.
        TypeError: complex or non-numeric dtype.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            "Expected an image of shape HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), channels last; "
            f"got shape {np.shape(image)}."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Expected a non-empty image, got shape {np.shape(image)}.")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"Expected a real-valued image (bool, integer or float), got dtype {array.dtype}.")
    if array.shape[2] == 4:
        array = array[..., :3]
    if array.dtype != np.uint8:
        array = rescale_to_uint8(array, contrast_limits)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def rescale_to_uint8(array: np.ndarray, contrast_limits: Optional[Sequence[float]] = None) -> np.ndarray:
    """Map intensities linearly from (low, high) to [0, 255], clip and round to uint8.

    Args:
        array: array of any real dtype and shape.
        contrast_limits: (low, high); default: the robust percentiles of the finite values.

    Returns:
        uint8 array of the same shape.
    """
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float32, copy=False)
    if contrast_limits is None:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return np.zeros(array.shape, dtype=np.uint8)
        low, high = np.percentile(finite, ROBUST_PERCENTILES)
    else:
        low, high = (float(v) for v in contrast_limits)
        if not high > low:
            raise ValueError(f"contrast_limits must be (low, high) with low < high, got {tuple(contrast_limits)}.")
    if not high > low:  # constant image
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (values - np.float32(low)) * np.float32(255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
