"""TiledPredictor: the answering tile gives exactly SamPredictor's masks on its crop, objects across
tile borders come out whole, only touched tiles are embedded and read, any image the 2-D path
takes, and tile embeddings read back from a store.

All with the bundled trained ``vit_small`` (input 256 px: default tiles of 256 px, halo 32 px,
cores on a 192 px grid).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_sam import SamPredictor, TiledPredictor
from napari_sam.tiled_predictor import OUTSIDE_CROP_LOGIT
from napari_sam.utils.image import to_rgb_uint8


@pytest.fixture(scope="module")
def truck_700x900(truck):
    """A 700 x 900 part of a real photo (4 x 5 tiles of 256 px)."""
    return np.ascontiguousarray(truck[250:950, 450:1350])


def blobs(shape, ellipses, seed=0, colour=False):
    """Bright ellipses on a noisy, smoothly textured background (made in the test).

    Args:
        shape: (H, W).
        ellipses: (cy, cx, ry, rx) in pixels.
        colour: HxWx3 with reddish objects on a bluish-green background instead of HxW grey.

    Returns:
        HxW (or HxWx3) float64 image in about [0, 255] and the HxW bool mask of each ellipse.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = rng.normal(40, 8, shape) + gaussian_filter(rng.normal(0, 30, shape), 6)
    truth = []
    for cy, cx, ry, rx in ellipses:
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside] = rng.normal(190, 10, inside.sum())
        truth.append(inside)
    image = np.clip(image, 0, 255)
    if colour:
        object_pixels = np.any(truth, axis=0)
        image = np.stack([image, np.where(object_pixels, 0.4, 1.0) * image, np.where(object_pixels, 0.2, 0.9) * image], -1)
    return image, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def crop_prediction(sam, image, tile, contrast_limits=None, **prompts):
    """SamPredictor on the tile's crop alone, prompts shifted by hand into the crop's frame."""
    predictor = SamPredictor(sam)
    predictor.set_image(image[tile.crop_slices], contrast_limits=contrast_limits)
    y0, x0 = tile.offset
    if prompts.get("point_coords") is not None:
        prompts["point_coords"] = np.asarray(prompts["point_coords"], float) - [x0, y0]
    if prompts.get("box") is not None:
        prompts["box"] = np.asarray(prompts["box"], float) - [x0, y0, x0, y0]
    return predictor, predictor.predict(**prompts)


# -- a prompt in one tile's core: exactly SamPredictor on that tile's crop --------------------------


@pytest.fixture(scope="module")
def tiled_truck(sam, truck_700x900):
    predictor = TiledPredictor(sam)
    predictor.set_image(truck_700x900)
    return predictor


@pytest.mark.parametrize(
    "position, prompts",
    [
        # an inner tile: core y 192..384, x 384..576, crop y 160..416, x 352..608
        ((1, 2), {"point_coords": [[470.0, 300.0], [420.0, 250.0]], "point_labels": [1, 0]}),
        ((1, 2), {"box": [400.0, 220.0, 560.0, 370.0], "multimask_output": False}),
        # the bottom-right tile, whose crop is shifted inside the image: core y 576..700,
        # x 768..900, crop y 444..700, x 644..900
        ((3, 4), {"point_coords": [[820.0, 640.0]], "point_labels": [1]}),
        ((3, 4), {"point_coords": [[800.0, 600.0]], "point_labels": [1], "box": [780, 590, 890, 690]}),
    ],
)
def test_a_prompt_in_one_core_gives_samPredictor_masks_on_that_crop(sam, truck_700x900, tiled_truck, position, prompts):
    tile = tiled_truck.tile_for(prompts.get("point_coords"), prompts.get("point_labels"), prompts.get("box"))
    assert tile.position == position
    masks, scores, low_res, offset = tiled_truck.predict(**prompts, return_crop=True)
    _, (expected_masks, expected_scores, expected_low_res) = crop_prediction(sam, truck_700x900, tile, **prompts)
    assert offset == tile.offset
    assert masks.dtype == np.bool_ and masks.shape == expected_masks.shape == (len(expected_scores), 256, 256)
    assert masks.any()
    assert np.array_equal(masks, expected_masks)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    np.testing.assert_allclose(low_res, expected_low_res, atol=1e-5)

    full, full_scores, _ = tiled_truck.predict(**prompts)
    assert full.shape == (len(scores), 700, 900) and full.dtype == np.bool_
    y0, x0 = offset
    assert np.array_equal(full[:, y0 : y0 + 256, x0 : x0 + 256], masks)
    outside = full.copy()
    outside[:, y0 : y0 + 256, x0 : x0 + 256] = False
    assert not outside.any()
    np.testing.assert_array_equal(full_scores, scores)


def test_logits_mask_prompts_and_reuse_of_the_tile(sam, truck_700x900, tiled_truck):
    point = {"point_coords": np.array([[470.0, 300.0]]), "point_labels": np.array([1])}
    logits, scores, low_res = tiled_truck.predict(**point, return_logits=True)
    tile = tiled_truck.tile_for(**point)
    y0, x0, y1, x1 = tile.crop
    assert logits.dtype == np.float32 and logits.shape == (3, 700, 900)
    assert np.isfinite(logits[:, y0:y1, x0:x1]).all()
    assert (logits[:, :y0] == OUTSIDE_CROP_LOGIT).all() and (logits[:, :, x1:] == OUTSIDE_CROP_LOGIT).all()
    masks, _, _ = tiled_truck.predict(**point)
    assert np.array_equal(logits > sam.mask_threshold, masks)

    # a second prompt on the same tile keeps the embedding and the decoder's per-image work
    decoder = tiled_truck.predictor.prompt_batch_decoder()
    best = low_res[np.argmax(scores)][None]
    refined, refined_scores, _ = tiled_truck.predict(
        **point, mask_input=best, multimask_output=False, return_crop=True
    )[:3]
    assert tiled_truck.predictor.prompt_batch_decoder() is decoder
    crop_predictor, (expected, expected_scores, _) = crop_prediction(
        sam, truck_700x900, tile, **point, mask_input=best, multimask_output=False
    )
    assert np.array_equal(refined, expected)
    np.testing.assert_allclose(refined_scores, expected_scores, atol=1e-5)


def test_an_image_no_larger_than_a_tile_is_the_untiled_prediction(sam, groceries):
    image = np.ascontiguousarray(groceries[100:300, 200:450])  # 200 x 250
    tiled = TiledPredictor(sam)
    tiled.set_image(image)
    assert len(tiled.grid) == 1
    prompts = {"point_coords": np.array([[120.0, 90.0]]), "point_labels": np.array([1])}
    masks, scores, low_res = tiled.predict(**prompts)
    untiled = SamPredictor(sam)
    untiled.set_image(image)
    expected, expected_scores, expected_low_res = untiled.predict(**prompts)
    assert np.array_equal(masks, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    np.testing.assert_allclose(low_res, expected_low_res, atol=1e-5)


# -- objects across tile borders ----------------------------------------------------------------------

# 768 x 768: cores on a 192 px grid (borders at 192, 384, 576), crops with a 32 px halo.
OTHER_OBJECTS = [(100, 100, 18, 18), (600, 500, 25, 15), (470, 180, 20, 28), (200, 650, 15, 22)]


@pytest.mark.parametrize(
    "ellipse, prompt",
    [
        ((300, 380, 28, 30), "point"),  # across the x = 384 border, anchored in the left tile
        ((300, 388, 28, 30), "point"),  # the same border, anchored in the right tile
        ((390, 300, 30, 26), "point"),  # across the y = 384 border
        ((380, 380, 25, 25), "point"),  # on the corner of four cores
        ((300, 388, 28, 30), "box"),
    ],
)
def test_an_object_across_a_tile_border_comes_out_whole(sam, ellipse, prompt):
    image, truth = blobs((768, 768), [ellipse, *OTHER_OBJECTS])
    image = image.astype(np.uint8)
    target = truth[0]
    cy, cx, ry, rx = ellipse
    tiled = TiledPredictor(sam)
    tiled.set_image(image)
    assert tiled.halo == (32, 32) and tiled.grid.core_step == (192, 192)
    # the object really lies in more than one core, and reaches at most the halo beyond its tile's core
    ys, xs = np.nonzero(target)
    cores = {tiled.grid.tile_at(y, x).index for y, x in zip(ys, xs)}
    assert len(cores) >= 2
    if prompt == "point":
        prompts = {"point_coords": np.array([[cx, cy]], float), "point_labels": np.array([1])}
        multimask = True
    else:
        prompts = {"box": np.array([cx - rx - 3, cy - ry - 3, cx + rx + 3, cy + ry + 3], float)}
        multimask = False
    tile = tiled.tile_for(**prompts)
    cy0, cx0, cy1, cx1 = tile.core
    assert ys.min() >= cy0 - 32 and ys.max() < cy1 + 32 and xs.min() >= cx0 - 32 and xs.max() < cx1 + 32

    masks, scores, _ = tiled.predict(**prompts, multimask_output=multimask)
    mask = masks[np.argmax(scores)]
    # whole: the object's pixels in every core it touches are found
    assert iou(mask, target) >= 0.9
    assert (mask & target).sum() >= 0.95 * target.sum()
    for index in cores:
        core = np.zeros_like(target)
        y0, x0, y1, x1 = tiled.grid[index].core
        core[y0:y1, x0:x1] = True
        assert (mask & core).sum() >= 0.9 * (target & core).sum()

    # and equal to an untiled prediction on a 256 px crop centred on the object
    y0, x0 = cy - 128, cx - 128
    untiled = SamPredictor(sam)
    untiled.set_image(image[y0 : y0 + 256, x0 : x0 + 256])
    shifted = dict(prompts)
    if prompt == "point":
        shifted["point_coords"] = prompts["point_coords"] - [x0, y0]
    else:
        shifted["box"] = prompts["box"] - [x0, y0, x0, y0]
    crop_masks, crop_scores, _ = untiled.predict(**shifted, multimask_output=multimask)
    reference = np.zeros_like(target)
    reference[y0 : y0 + 256, x0 : x0 + 256] = crop_masks[np.argmax(crop_scores)]
    agreement = iou(mask, reference)
    print(f"{ellipse} {prompt}: IoU tiled vs untiled crop {agreement:.3f}, vs truth {iou(mask, target):.3f}")
    assert agreement >= 0.95


# -- laziness: only touched tiles are embedded, and only their crops are read --------------------------


class RecordingArray:
    """A lazily sliced image (like a zarr or dask array): records every region read."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self._array[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole image was converted to a numpy array")


def test_only_touched_tiles_are_embedded_and_read(sam):
    rng = np.random.default_rng(3)
    image = RecordingArray(gaussian_filter(rng.normal(100, 40, (2048, 2048)), 3).clip(0, 255).astype(np.uint8))
    tiled = TiledPredictor(sam)
    tiled.set_image(image)
    assert len(tiled.grid) == 11 * 11
    assert tiled.embeddings.computed == [] and image.reads == []

    first = {"point_coords": np.array([[1000.0, 1010.0]]), "point_labels": np.array([1])}
    masks, _, _ = tiled.predict(**first)
    tile = tiled.tile_for(**first)
    assert masks.shape == (3, 2048, 2048)
    assert tiled.embeddings.computed == [tile.index]
    assert image.reads == [tile.crop_slices]

    # another prompt on the same tile: no embedding, no read
    tiled.predict(box=np.array([950, 980, 1050, 1060]))
    assert tiled.tile_for(box=np.array([950, 980, 1050, 1060])) == tile
    assert tiled.embeddings.computed == [tile.index] and len(image.reads) == 1

    # a prompt in another tile: one more embedding, one more crop read
    other = {"point_coords": np.array([[100.0, 1900.0]]), "point_labels": np.array([1])}
    other_tile = tiled.tile_for(**other)
    assert other_tile != tile
    tiled.predict(**other)
    assert tiled.embeddings.computed == [tile.index, other_tile.index]
    assert image.reads == [tile.crop_slices, other_tile.crop_slices]

    # back to the first tile: its embedding is still in memory
    tiled.predict(**first)
    assert tiled.embeddings.computed == [tile.index, other_tile.index] and len(image.reads) == 2


def test_a_10000_px_image_costs_one_tile_and_embedding_steps_report_progress(sam):
    image = RecordingArray(np.broadcast_to(np.uint8(90), (10_000, 10_000, 3)))  # no memory behind it
    tiled = TiledPredictor(sam)
    tiled.set_image(image)
    assert len(tiled.grid) == 53 * 53 and tiled.original_size == (10_000, 10_000)
    prompt = {"point_coords": np.array([[7321.0, 4567.0]]), "point_labels": np.array([1])}
    tile = tiled.tile_for(**prompt)
    assert image.reads == []
    steps = tiled.embedding_steps(tile)
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration:
            break
    total = len(sam.image_encoder.blocks) + 1
    assert progress == [(i, total) for i in range(1, total + 1)]
    masks, _, _, offset = tiled.predict(**prompt, return_crop=True)
    assert masks.shape == (3, 256, 256) and offset == tile.offset
    assert tiled.embeddings.computed == [tile.index] and image.reads == [tile.crop_slices]


# -- any image the 2-D path takes ---------------------------------------------------------------------

ELLIPSES = [(300, 380, 28, 30), (120, 150, 20, 24), (520, 560, 26, 22)]


def test_uint16_single_channel_with_one_mapping_for_all_tiles(sam):
    image, truth = blobs((640, 640), ELLIPSES, seed=5)
    image16 = (image * 150 + 1000).astype(np.uint16)
    tiled = TiledPredictor(sam)
    tiled.set_image(image16)
    limits = tiled.embeddings.contrast_limits
    assert limits == pytest.approx(np.percentile(image16.astype(np.float32), (0.5, 99.5)))
    prompts = {"point_coords": np.array([[380.0, 300.0]]), "point_labels": np.array([1])}
    masks, scores, _, _ = tiled.predict(**prompts, return_crop=True)
    tile = tiled.tile_for(**prompts)
    _, (expected, expected_scores, _) = crop_prediction(sam, image16, tile, contrast_limits=limits, **prompts)
    assert np.array_equal(masks, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    full = tiled.paste(masks, tile)[np.argmax(scores)]
    assert iou(full, truth[0]) >= 0.85


def test_tiles_of_a_uint16_image_share_the_display_mapping(sam):
    # left half dim (100..200), right half bright (up to 60000), one patch of 150 in each
    rng = np.random.default_rng(0)
    image = np.empty((600, 600), np.uint16)
    image[:, :300] = rng.integers(100, 200, (600, 300))
    image[:, 300:] = rng.integers(1000, 60000, (600, 300))
    image[50:60, 50:60] = 150
    image[50:60, 500:510] = 150
    tiled = TiledPredictor(sam)
    tiled.set_image(image)
    left, right = tiled.grid.tile_at(55, 55), tiled.grid.tile_at(55, 505)
    assert left != right
    grey = []
    for tile, x in ((left, 55), (right, 505)):
        rgb = tiled.embeddings.crop_rgb(tile)
        y0, x0 = tile.offset
        grey.append(rgb[55 - y0, x - x0])
    assert np.array_equal(grey[0], grey[1])
    # per-tile percentiles would have given the left patch a mid grey and the right one black
    low, high = tiled.embeddings.contrast_limits
    assert tuple(grey[0]) == tuple(to_rgb_uint8(np.array([[150]], np.uint16), (low, high))[0, 0])
    # explicit contrast limits are used for every tile
    tiled.set_image(image, contrast_limits=(100, 300))
    for tile in (left, right):
        assert np.array_equal(tiled.embeddings.crop_rgb(tile), to_rgb_uint8(image[tile.crop_slices], (100, 300)))
    assert tiled.embeddings.computed == []


def test_uint8_contrast_limits_are_applied_as_napari_shows_them(sam, truck_700x900):
    # napari maps uint8 layers from their contrast limits too: (0, 255) is the data as it is,
    # other limits stretch it (SamPredictor.set_image ignores them for uint8; tiles follow napari)
    tiled = TiledPredictor(sam)
    tile = None
    for limits in (None, (0, 255)):
        tiled.set_image(truck_700x900, contrast_limits=limits)
        tile = tiled.grid.tile_at(300, 400)
        assert tiled.embeddings.contrast_limits is None
        assert np.array_equal(tiled.embeddings.crop_rgb(tile), truck_700x900[tile.crop_slices])
    tiled.set_image(truck_700x900, contrast_limits=(50, 150))
    stretched = tiled.embeddings.crop_rgb(tile)
    expected = to_rgb_uint8(truck_700x900[tile.crop_slices].astype(np.float32), (50, 150))
    assert np.array_equal(stretched, expected)
    assert not np.array_equal(stretched, truck_700x900[tile.crop_slices])


def test_rgba_and_bgr_give_the_masks_of_rgb(sam):
    image, _ = blobs((640, 640), ELLIPSES, seed=6, colour=True)
    rgb = image.astype(np.uint8)
    prompts = {"point_coords": np.array([[380.0, 300.0]]), "point_labels": np.array([1]), "return_logits": True}

    def logits(array, image_format="RGB"):
        tiled = TiledPredictor(sam)
        tiled.set_image(array, image_format=image_format)
        return tiled.predict(**prompts, return_crop=True)[0]

    expected = logits(rgb)
    alpha = np.random.default_rng(0).integers(0, 256, (640, 640, 1), dtype=np.uint8)
    np.testing.assert_allclose(logits(np.concatenate([rgb, alpha], axis=2)), expected, atol=1e-5)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    np.testing.assert_allclose(logits(bgr, "BGR"), expected, atol=1e-5)
    # the channel order matters: the same BGR pixels read as RGB give other logits
    assert not np.allclose(logits(bgr, "RGB"), expected, atol=1e-3)


# -- embeddings read back from a store ------------------------------------------------------------------


class DictStore:
    """An in-memory store with what :class:`napari_sam.tiling.TileStoreProtocol` asks for."""

    def __init__(self, refuse=False):
        self.refuse = refuse
        self.entries = {}
        self.checked = []

    def check_image(self, grid, dtype):
        self.checked.append((grid.image_shape, grid.tile_shape, grid.halo, np.dtype(dtype)))
        if self.refuse:
            raise ValueError("store of another image")

    def load(self, plane_index, tile, limits, pixels):
        entry = self.entries.get((plane_index, tile.index, limits))
        if entry is None or not np.array_equal(entry[0], pixels):
            return None
        return entry[1]

    def save(self, plane_index, tile, limits, pixels, embedding):
        self.entries[(plane_index, tile.index, limits)] = (np.array(pixels), embedding)


def test_a_second_predictor_reads_tile_embeddings_from_the_store(sam, truck_700x900):
    store = DictStore()
    prompts = {"point_coords": np.array([[470.0, 300.0]]), "point_labels": np.array([1])}
    first = TiledPredictor(sam, store=store)
    first.set_image(truck_700x900, plane_index=2)
    expected = first.predict(**prompts, return_logits=True)
    tile = first.tile_for(**prompts)
    assert first.embeddings.computed == [tile.index] and first.embeddings.loaded == []
    assert list(store.entries) == [(2, tile.index, None)]
    assert store.checked == [((700, 900), (256, 256), (32, 32), np.dtype(np.uint8))]

    second = TiledPredictor(sam, store=store)
    second.set_image(truck_700x900, plane_index=2)
    result = second.predict(**prompts, return_logits=True)
    assert second.embeddings.computed == [] and second.embeddings.loaded == [tile.index]
    for got, want in zip(result, expected):
        assert np.array_equal(got, want)

    # another plane of the store is not this one: computed, and saved under its own index
    third = TiledPredictor(sam, store=store)
    third.set_image(truck_700x900, plane_index=0)
    third.predict(**prompts)
    assert third.embeddings.computed == [tile.index] and (0, tile.index, None) in store.entries


def test_a_store_that_does_not_fit_is_refused_at_set_image(sam, truck_700x900):
    tiled = TiledPredictor(sam, store=DictStore(refuse=True))
    with pytest.raises(ValueError, match="another image"):
        tiled.set_image(truck_700x900)
    assert not tiled.is_image_set


# -- errors -------------------------------------------------------------------------------------------


def test_bad_prompts_are_refused_before_any_embedding(sam, truck_700x900):
    tiled = TiledPredictor(sam)
    with pytest.raises(RuntimeError, match="set_image"):
        tiled.predict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1]))
    tiled.set_image(truck_700x900)
    cases = [
        ({}, "needs a prompt point .* or a box"),
        ({"mask_input": np.zeros((1, 128, 128), np.float32)}, "mask_input alone"),
        ({"point_coords": np.zeros((0, 2)), "point_labels": np.zeros(0)}, "needs a prompt point"),
        ({"point_coords": np.array([[10.0, 20.0]])}, "point_labels must be given"),
        ({"point_labels": np.array([1])}, "without point_coords"),
        ({"point_coords": np.array([[10.0, 20.0]]), "point_labels": np.array([0.5])}, "1 \\(positive point\\)"),
        ({"point_coords": np.array([[np.nan, 20.0]]), "point_labels": np.array([1])}, "finite"),
        ({"point_coords": np.array([10.0, 20.0]), "point_labels": np.array([1])}, "Nx2"),
        ({"box": np.array([0, 0, np.inf, 10])}, "finite"),
        ({"box": np.array([0, 0, 10])}, "XYXY"),
    ]
    for prompts, match in cases:
        with pytest.raises(ValueError, match=match):
            tiled.predict(**prompts)
    assert tiled.embeddings.computed == []
    # a malformed mask prompt is refused by SamPredictor's own check
    with pytest.raises(ValueError, match="mask_input"):
        tiled.predict(
            point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([1]), mask_input=np.zeros((1, 64, 64))
        )


@pytest.mark.parametrize(
    "image, kwargs, error, match",
    [
        (np.zeros((5, 300, 300), np.uint8), {}, ValueError, "stack .* one plane at a time"),
        (np.zeros((2, 3, 300, 300), np.uint8), {}, ValueError, "plane_index"),
        (np.zeros((300, 300, 2), np.uint8), {}, ValueError, "HxWx3"),
        (np.zeros((0, 300), np.uint8), {}, ValueError, "non-empty"),
        (np.zeros((300, 300), np.complex64), {}, TypeError, "real-valued"),
        (np.zeros((300, 300), np.uint16), {"contrast_limits": (5, 5)}, ValueError, "low < high"),
        (np.zeros((300, 300), np.uint8), {"image_format": "BRG"}, ValueError, "RGB"),
    ],
)
def test_images_that_are_not_one_2d_image_are_refused(sam, image, kwargs, error, match):
    tiled = TiledPredictor(sam)
    with pytest.raises(error, match=match):
        tiled.set_image(image, **kwargs)
    assert not tiled.is_image_set


def test_constructor_defaults_and_invalid_tilings(sam):
    tiled = TiledPredictor(sam)
    assert tiled.tile_shape == (256, 256) and tiled.halo == (32, 32)
    assert TiledPredictor(sam, tile_shape=512).halo == (64, 64)
    assert TiledPredictor(sam, tile_shape=(256, 384), halo=(16, 40)).halo == (16, 40)
    with pytest.raises(ValueError, match="less than half"):
        TiledPredictor(sam, halo=128)
    with pytest.raises(ValueError, match="positive"):
        TiledPredictor(sam, tile_shape=0, halo=0)
