"""TileGrid: cores partition the image, crops have the tile shape and the halo; the anchor rule."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.tiling import (
    TileGrid,
    anchor_point,
    default_halo,
    default_tile_shape,
    needs_tiling,
    shared_contrast_limits,
)

# (image shape, tile shape, halo): multiples and non-multiples of the core step, images smaller
# than a tile on one or both axes, 1-pixel-thin images, anisotropic tiles, no halo.
GRIDS = [
    ((700, 900), 256, 32),
    ((768, 768), 256, 32),
    ((2048, 2048), 1024, 128),
    ((257, 513), 256, 32),
    ((400, 1000), 256, 32),  # last core narrower than the halo's worth of context before the border
    ((256, 256), 256, 32),
    ((100, 300), 256, 32),
    ((1, 1000), 256, 32),
    ((1000, 1), 256, 32),
    ((1, 1), 256, 32),
    ((300, 500), (128, 200), (20, 40)),
    ((333, 250), 64, 0),
    ((1000, 999), 101, 50),  # one-pixel cores
]


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@pytest.mark.parametrize("shape, tile_shape, halo", GRIDS)
def test_cores_partition_the_image_and_crops_hold_them_with_halo(shape, tile_shape, halo):
    grid = TileGrid(shape, tile_shape, halo)
    height, width = shape
    tile, margin = _pair(tile_shape), _pair(halo)
    cover = np.zeros(shape, dtype=np.int32)
    assert len(grid) == grid.grid_shape[0] * grid.grid_shape[1] >= 1
    for index, t in enumerate(grid):
        assert t.index == index and grid[index] is t
        assert t.position == (index // grid.grid_shape[1], index % grid.grid_shape[1])
        cy0, cx0, cy1, cx1 = t.core
        y0, x0, y1, x1 = t.crop
        assert cy0 < cy1 and cx0 < cx1, f"empty core {t.core}"
        cover[cy0:cy1, cx0:cx1] += 1
        # the crop lies in the image and has the tile shape wherever the image is large enough
        assert 0 <= y0 and 0 <= x0 and y1 <= height and x1 <= width
        assert (y1 - y0, x1 - x0) == tuple(min(s, ts) for s, ts in zip(shape, tile))
        assert t.crop_shape == (y1 - y0, x1 - x0)
        assert t.offset == (y0, x0)
        assert t.crop_box_xywh == [x0, y0, x1 - x0, y1 - y0]
        # the core lies in its crop with the halo (or all the image there is) on every side
        assert y0 <= max(cy0 - margin[0], 0) and x0 <= max(cx0 - margin[1], 0)
        assert y1 >= min(cy1 + margin[0], height) and x1 >= min(cx1 + margin[1], width)
    assert (cover == 1).all(), "every pixel must lie in exactly one core"


@pytest.mark.parametrize("shape", [(256, 256), (100, 250), (1, 1), (256, 1), (37, 256)])
def test_an_image_no_larger_than_a_tile_is_one_tile_covering_it(shape):
    grid = TileGrid(shape, 256, 32)
    assert len(grid) == 1 and grid.grid_shape == (1, 1)
    assert grid[0].core == grid[0].crop == (0, 0, *shape)


def test_an_image_one_pixel_larger_than_a_tile_is_two_full_size_tiles_per_axis():
    grid = TileGrid((257, 257), 256, 32)
    assert grid.grid_shape == (2, 2)
    assert [t.crop for t in grid] == [(0, 0, 256, 256), (0, 1, 256, 257), (1, 0, 257, 256), (1, 1, 257, 257)]


def test_regular_core_step():
    grid = TileGrid((700, 900), 256, 32)
    assert grid.core_step == (192, 192)
    assert grid.grid_shape == (4, 5)
    assert [t.core[1] for t in grid if t.position[0] == 0] == [0, 192, 384, 576, 768]
    # the last column's crop is shifted inside the image, keeping the full tile width
    last = grid.tiles[4]
    assert last.core == (0, 768, 192, 900) and last.crop == (0, 644, 256, 900)


def test_tile_at_returns_the_core_holding_the_point():
    grid = TileGrid((700, 900), 256, 32)
    rng = np.random.default_rng(0)
    for y, x in zip(rng.uniform(0, 700, 200), rng.uniform(0, 900, 200)):
        assert grid.tile_at(y, x).core_contains(y, x), (y, x)
    # core borders are half-open: 192 belongs to the second core
    assert grid.tile_at(191.99, 0).position == (0, 0)
    assert grid.tile_at(192, 0).position == (1, 0)
    # points outside the image count for the nearest core
    assert grid.tile_at(-5, -40).position == (0, 0)
    assert grid.tile_at(10_000, 10_000).position == (3, 4)
    assert grid.tile_at(350, 950).position == (1, 4)


def test_tile_for_box_uses_the_box_centre():
    grid = TileGrid((700, 900), 256, 32)
    # a box across the x = 384 core border whose centre is at x = 380: the left tile
    assert grid.tile_for_box([350, 250, 410, 300]).position == (1, 1)
    # shifting it to centre x = 390 moves it to the right tile
    assert grid.tile_for_box([360, 250, 420, 300]).position == (1, 2)
    # corners in any order mean the same box
    assert grid.tile_for_box([420, 300, 360, 250]).position == (1, 2)


def test_tiles_overlapping():
    grid = TileGrid((700, 900), 256, 32)
    hits = grid.tiles_overlapping((100, 100, 300, 200))  # y 100..300, x 100..200
    assert sorted(t.position for t in hits) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [t.position for t in grid.tiles_overlapping((0, 0, 1, 1))] == [(0, 0)]


def test_anchor_point_rule():
    points = np.array([[10.0, 20.0], [30.0, 40.0], [500.0, 600.0]])  # (x, y)
    labels = np.array([1, 1, 0])
    # a box wins over points: its centre, returned as (y, x)
    assert anchor_point(points, labels, np.array([0, 100, 50, 300])) == (200.0, 25.0)
    # else the mean of the positive points (the negative point far away does not count)
    assert anchor_point(points, labels, None) == (30.0, 20.0)
    # else the mean of all points
    assert anchor_point(points, np.array([0, 0, 0]), None) == pytest.approx((220.0, 180.0))
    assert anchor_point(points[:1], None, None) == (20.0, 10.0)
    with pytest.raises(ValueError, match="point or a box"):
        anchor_point(None, None, None)
    with pytest.raises(ValueError, match="point or a box"):
        anchor_point(np.zeros((0, 2)), np.zeros(0), None)


@pytest.mark.parametrize(
    "tile_shape, halo, match",
    [
        (256, 128, "less than half"),
        (256, 200, "less than half"),
        ((256, 128), (32, 64), "less than half"),
        (0, 0, "positive"),
        (-4, 1, "positive"),
        (256, -1, "zero or positive"),
        ((256, 256, 3), 32, "pair"),
    ],
)
def test_invalid_tilings_are_refused(tile_shape, halo, match):
    with pytest.raises(ValueError, match=match):
        TileGrid((1000, 1000), tile_shape, halo)


@pytest.mark.parametrize("shape", [(0, 100), (100, 0)])
def test_empty_images_are_refused(shape):
    with pytest.raises(ValueError, match="at least one pixel"):
        TileGrid(shape, 256, 32)


def test_defaults_and_auto_rule():
    assert default_tile_shape(1024) == (1024, 1024)
    assert default_halo(1024) == (128, 128)
    assert default_halo((256, 512)) == (32, 64)
    assert not needs_tiling((384, 300), 256)  # exactly 1.5x: not tiled
    assert needs_tiling((385, 300), 256)
    assert needs_tiling((200, 10_000), 1024)
    assert not needs_tiling((1024, 1024), 1024)


def test_shared_contrast_limits():
    rng = np.random.default_rng(1)
    assert shared_contrast_limits(np.zeros((10, 10, 3), np.uint8)) is None
    image = rng.normal(1000, 100, (300, 400)).astype(np.uint16)
    low, high = shared_contrast_limits(image)
    expected = np.percentile(image.astype(np.float32), (0.5, 99.5))
    assert (low, high) == pytest.approx(tuple(expected))
    assert shared_contrast_limits(np.full((20, 20), 7.0, np.float32)) == (7.0, 8.0)
    assert shared_contrast_limits(np.full((20, 20), np.nan, np.float32)) == (0.0, 1.0)
