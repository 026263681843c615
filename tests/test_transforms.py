"""ResizeLongestSide gives the reference's sizes, pixels and coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from napari_sam.utils.transforms import ResizeLongestSide

reference_transforms = pytest.importorskip("segment_anything.utils.transforms")


@pytest.mark.parametrize(
    "shape, expected",
    [((1500, 2250), (683, 1024)), ((480, 640), (768, 1024)), ((300, 200), (1024, 683)), ((1024, 1024), (1024, 1024))],
)
def test_preprocess_shape(shape, expected):
    assert ResizeLongestSide.get_preprocess_shape(*shape, 1024) == expected
    assert reference_transforms.ResizeLongestSide.get_preprocess_shape(*shape, 1024) == expected


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_apply_image_same_pixels(name):
    image = getattr(data, name)()
    ours = ResizeLongestSide(1024).apply_image(image)
    ref = reference_transforms.ResizeLongestSide(1024).apply_image(image)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert max(ours.shape[:2]) == 1024
    np.testing.assert_array_equal(ours, ref)


def test_apply_image_shrinks_large_image_like_reference(truck):
    ours = ResizeLongestSide(1024).apply_image(truck)
    ref = reference_transforms.ResizeLongestSide(1024).apply_image(truck)
    np.testing.assert_array_equal(ours, ref)


def test_coords_and_boxes_match_reference():
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 700, size=(5, 2))
    boxes = rng.uniform(0, 700, size=(3, 4))
    ours, ref = ResizeLongestSide(1024), reference_transforms.ResizeLongestSide(1024)
    for size in [(534, 800), (1200, 1800), (333, 777)]:
        np.testing.assert_array_equal(ours.apply_coords(coords, size), ref.apply_coords(coords, size))
        np.testing.assert_array_equal(ours.apply_boxes(boxes, size), ref.apply_boxes(boxes, size))
        t_coords, t_boxes = torch.as_tensor(coords), torch.as_tensor(boxes)
        ours_t = ours.apply_coords_torch(t_coords, size)
        assert ours_t.dtype == torch.float32
        assert torch.equal(ours_t, ref.apply_coords_torch(t_coords, size))
        assert torch.equal(ours.apply_boxes_torch(t_boxes, size), ref.apply_boxes_torch(t_boxes, size))
    # The input is not modified in place.
    assert np.array_equal(coords, rng.__class__(rng.bit_generator.__class__(0)).uniform(0, 700, size=(5, 2)))


def test_apply_image_torch_uses_height_and_width():
    """The reference sizes the output from shape[0], shape[1] (batch and channels) of the
    BxCxHxW input, a bug; ours uses H and W, so the result has the aspect of apply_image."""
    image = torch.as_tensor(data.astronaut()[:300]).permute(2, 0, 1)[None].float()
    ours = ResizeLongestSide(1024).apply_image_torch(image)
    assert ours.shape == (1, 3, 600, 1024)
    expected = torch.nn.functional.interpolate(
        image, (600, 1024), mode="bilinear", align_corners=False, antialias=True
    )
    assert torch.equal(ours, expected)
    ref = reference_transforms.ResizeLongestSide(1024).apply_image_torch(image)
    assert ref.shape != ours.shape  # documents the reference bug we do not copy
