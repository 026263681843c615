"""The one conversion of scientific images to SAM's RGB uint8 input."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from napari_sam.utils.image import ROBUST_PERCENTILES, to_rgb_uint8


def test_uint8_rgb_is_passed_through_unchanged():
    image = data.astronaut()
    out = to_rgb_uint8(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("layout", ["2d", "hw1"])
def test_grayscale_is_replicated(layout):
    gray = data.camera()
    image = gray if layout == "2d" else gray[..., None]
    out = to_rgb_uint8(image)
    assert out.shape == gray.shape + (3,)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_rgba_drops_alpha():
    rgb = data.astronaut()
    alpha = np.full(rgb.shape[:2] + (1,), 17, dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(np.concatenate([rgb, alpha], axis=2)), rgb)


def camera_like_uint16() -> np.ndarray:
    """A real micrograph (skimage ``cell``) as a 12-bit camera writes it into uint16:
    offset 100, gain 16, plus shot noise."""
    rng = np.random.default_rng(0)
    signal = data.cell().astype(np.float64) * 16 + 100
    return np.clip(rng.poisson(signal), 0, 4095).astype(np.uint16)


def test_uint16_with_contrast_limits_is_mapped_linearly():
    cells = camera_like_uint16()
    low, high = 1000.0, 3000.0
    out = to_rgb_uint8(cells, contrast_limits=(low, high))
    expected = np.clip(np.rint((cells.astype(np.float64) - low) * 255.0 / (high - low)), 0, 255)
    np.testing.assert_allclose(out[..., 0], expected, atol=1)
    assert out[cells <= low].max() == 0 and out[cells >= high].min() == 255


def test_uint16_without_limits_uses_robust_percentiles():
    cells = camera_like_uint16()
    out = to_rgb_uint8(cells)
    low, high = np.percentile(cells, ROBUST_PERCENTILES)
    # About 0.5 % of pixels saturate at each end, and the full range is used.
    assert np.mean(out[..., 0] == 255) == pytest.approx(np.mean(cells >= high), abs=0.002)
    assert out.min() == 0 and out.max() == 255
    assert np.mean(cells <= low) >= 0.004


def test_float_image_and_nan():
    image = data.camera().astype(np.float32) / 255.0
    image[0, 0] = np.nan
    out = to_rgb_uint8(image, contrast_limits=(0.0, 1.0))
    np.testing.assert_allclose(out[1:, 1:, 0].astype(int), data.camera()[1:, 1:].astype(int), atol=1)
    assert out[0, 0, 0] == 0


def test_bool_and_constant_images():
    mask = data.horse()
    assert set(np.unique(to_rgb_uint8(mask))) == {0, 255}
    assert to_rgb_uint8(np.full((8, 8), 5.0)).max() == 0


@pytest.mark.parametrize("shape", [(5,), (4, 4, 2), (4, 4, 5), (2, 4, 4, 3), (0, 4, 3)])
def test_bad_shapes_raise_clear_error(shape):
    with pytest.raises(ValueError, match="HxW|non-empty"):
        to_rgb_uint8(np.zeros(shape, dtype=np.uint8))


def test_bad_dtype_and_limits():
    with pytest.raises(TypeError, match="real-valued"):
        to_rgb_uint8(np.zeros((4, 4), dtype=complex))
    with pytest.raises(ValueError, match="low < high"):
        to_rgb_uint8(np.zeros((4, 4), dtype=np.uint16), contrast_limits=(10, 10))
