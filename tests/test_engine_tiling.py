"""The engine's tiled path (napari-free): the tiling choice, lazy slice reading, store plane
numbers, and tiled predictions that embed only the tiles the prompts need."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.interactive.engine import (
    SamEngine, SlicePlane, TileProgress, TilingChoice, store_plane_index,
)
from napari_sam.interactive.prompts import ObjectPrompt, SliceSpec
from napari_sam.utils.progress import drain


@pytest.fixture(scope="module")
def scene(truck):
    """768 x 768 RGB crop of the truck photo (3x vit_small's 256 px input: auto tiling is on)."""
    return np.ascontiguousarray(truck[200:968, 500:1268])


def test_tiling_choice_resolves_auto_on_off():
    auto = TilingChoice()
    assert auto.resolve((768, 768), 256) == ((256, 256), (32, 32))
    assert auto.resolve((384, 300), 256) is None  # 1.5x the input: not tiled
    assert auto.resolve((385, 300), 256) == ((256, 256), (32, 32))
    assert auto.resolve((300, 200), 256, with_store=True) == ((300, 200), (0, 0))  # one whole-slice tile
    assert TilingChoice("on").resolve((100, 100), 1024) == ((1024, 1024), (128, 128))
    assert TilingChoice("off").resolve((5000, 5000), 256) is None
    assert TilingChoice("on", tile_shape=512, halo=0).resolve((600, 600), 256) == ((512, 512), (0, 0))
    assert TilingChoice("on", tile_shape=(200, 300)).resolve((600, 600), 256) == ((200, 300), (25, 37))
    with pytest.raises(ValueError, match="tiling must be one of"):
        TilingChoice("yes")
    with pytest.raises(ValueError, match="tile_shape"):
        TilingChoice("on", tile_shape=(1, 2, 3))


class CountingArray:
    """An nD array that records every read, as a zarr or dask layer would be read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        part = self.array[key]
        self.reads.append(part.size)
        return part


def test_slice_plane_reads_only_what_is_asked():
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 4000, size=(3, 40, 50), dtype=np.uint16)
    data = CountingArray(stack)
    spec = SliceSpec((3, 40, 50), 1, 2, (2, -1, -1))
    plane = SlicePlane(data, spec, rgb=False)
    assert plane.shape == (40, 50) and plane.dtype == np.uint16
    assert np.array_equal(plane[5:15, 10:30], stack[2, 5:15, 10:30])
    assert data.reads == [200]
    assert np.array_equal(np.asarray(plane), spec.take(stack))
    # A transposed display (columns along axis 1) reads the same pixels as SliceSpec.take.
    transposed = SliceSpec((3, 40, 50), 2, 1, (1, -1, -1))
    view = SlicePlane(stack, transposed, rgb=False)
    assert view.shape == (50, 40)
    assert np.array_equal(view[3:9, 4:20], transposed.take(stack)[3:9, 4:20])
    rgb = SlicePlane(np.zeros((2, 10, 12, 3), np.uint8), SliceSpec((2, 10, 12), 1, 2, (0, -1, -1)), rgb=True)
    assert rgb.shape == (10, 12, 3) and rgb[0:2, 0:3].shape == (2, 3, 3)


def test_store_plane_index_is_c_order_over_the_other_axes():
    assert store_plane_index(SliceSpec.for_2d((10, 10))) == 0
    assert store_plane_index(SliceSpec((4, 5, 10, 10), 2, 3, (2, 3, -1, -1))) == 2 * 5 + 3
    with pytest.raises(ValueError, match="last two axes"):
        store_plane_index(SliceSpec((4, 10, 10), 0, 2, (-1, 3, -1)))


def _predict_on_crop(model, crop_rgb, obj, offset):
    """What SamPredictor gives on one tile's crop, for a prompt in the full frame (best of 3)."""
    from napari_sam import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image(crop_rgb)
    y0, x0 = offset
    kwargs = obj.predict_kwargs()
    if "point_coords" in kwargs:
        kwargs["point_coords"] = kwargs["point_coords"] - [x0, y0]
    if kwargs.get("box") is not None:
        kwargs["box"] = kwargs["box"] - [x0, y0, x0, y0]
    masks, scores, _ = predictor.predict(**kwargs)
    return masks[int(np.argmax(scores))]


def test_tiled_prediction_embeds_only_the_prompted_tiles(sam, scene):
    from napari_sam.tiling import TileGrid

    engine = SamEngine(model=sam)
    spec = SliceSpec.for_2d(scene.shape[:2])
    plane = SlicePlane(CountingArray(scene), spec, rgb=True)
    tile_shape, halo = TilingChoice().resolve(spec.plane_shape, engine.input_size)
    grid = TileGrid(spec.plane_shape, tile_shape, halo)
    assert len(grid) == 16

    # No prompt: nothing embedded, nothing read.
    assert drain(engine.tiled_prediction_steps(plane, [], tile_shape, halo, cache_key=("slice",))) == []
    assert engine.embeddings_computed == 0 and plane.data.reads == []

    click = ObjectPrompt(np.array([[400.0, 300.0]]), np.array([1]))  # (x, y): tile at row 1, column 2
    progress = []
    masks = drain(engine.tiled_prediction_steps(plane, [click], tile_shape, halo, cache_key=("slice",)),
                  progress.append)
    tile = grid.tile_at(300, 400)
    assert engine.embeddings_computed == 1
    assert progress and all(isinstance(p, TileProgress) for p in progress)
    assert {(p.tile, p.tiles) for p in progress} == {(tile.index + 1, 16)}
    assert progress[-1].done == progress[-1].total
    assert sum(plane.data.reads) == 256 * 256 * 3  # only that tile's crop was read
    expected = np.zeros(spec.plane_shape, bool)
    expected[tile.crop_slices] = _predict_on_crop(sam, scene[tile.crop_slices], click, tile.offset)
    assert masks[0].shape == spec.plane_shape and masks[0].dtype == np.bool_
    assert expected.any() and np.array_equal(masks[0], expected)

    # Another prompt in the same tile: no encoder work; a box in another tile: one more tile.
    box = ObjectPrompt(box=np.array([60.0, 620.0, 180.0, 720.0]))
    again = ObjectPrompt(np.array([[420.0, 310.0]]), np.array([1]))
    masks = drain(engine.tiled_prediction_steps(plane, [again, box], tile_shape, halo, cache_key=("slice",)))
    assert engine.embeddings_computed == 2 and len(masks) == 2
    box_tile = grid.tile_for_box(box.box)
    assert box_tile.index != tile.index
    expected_box = np.zeros(spec.plane_shape, bool)
    expected_box[box_tile.crop_slices] = _predict_on_crop(sam, scene[box_tile.crop_slices], box,
                                                          box_tile.offset)
    assert np.array_equal(masks[1], expected_box)
    # The tiles are in the engine's cache under the slice's key, the tiling and the tile index.
    assert ((("slice",), ("tiles", (256, 256), (32, 32))), tile.index) in engine.cache


def test_one_whole_slice_tile_equals_the_untiled_prediction(sam, scene):
    engine = SamEngine(model=sam)
    spec = SliceSpec.for_2d(scene.shape[:2])
    click = ObjectPrompt(np.array([[400.0, 300.0], [100.0, 600.0]]), np.array([1, 0]))
    tile_shape, halo = TilingChoice("off").resolve(spec.plane_shape, 256, with_store=True)
    tiled = drain(engine.tiled_prediction_steps(SlicePlane(scene, spec, True), [click], tile_shape, halo))
    untiled = engine.predict_objects(engine.embed(scene), [click])
    assert engine.embeddings_computed == 2
    assert untiled[0].any() and np.array_equal(tiled[0], untiled[0])


def test_closing_a_tiled_job_frees_the_engine(sam, scene):
    import threading

    engine = SamEngine(model=sam)
    spec = SliceSpec.for_2d(scene.shape[:2])
    steps = engine.tiled_prediction_steps(SlicePlane(scene, spec, True), [ObjectPrompt(np.array([[10.0, 10.0]]),
                                          np.array([1]))], (256, 256), (32, 32))
    assert isinstance(next(steps), TileProgress)
    steps.close()
    assert engine.embeddings_computed == 0
    taken = []
    thread = threading.Thread(target=lambda: taken.append(engine.lock.acquire(timeout=5)))
    thread.start()
    thread.join()
    assert taken == [True]
