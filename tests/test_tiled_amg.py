"""TiledAutomaticMaskGenerator: small objects on a large image, the merge rule at tile borders,
full-frame RLEs from crop masks, degeneration to the plain generator, stored embeddings, cancel.

The model is the bundled, trained ``vit_small`` (input 256 px: default tiles of 256 px, halo
32, cores of 192 px). Images are synthetic fluorescence-like nuclei made here, so the ground
truth is known.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_sam import AmgSettings, SamAutomaticMaskGenerator, TiledAutomaticMaskGenerator
from napari_sam.automatic_mask_generator import AmgProgress
from napari_sam.tiled_amg import TiledAmgProgress, crop_mask_to_rle
from napari_sam.utils.amg import batched_mask_to_box, mask_to_rle, rle_to_mask


def _settings(**changes):
    # The bundled model's own thresholds; 16 points per side: one point every 16 px of a 256 px tile.
    return AmgSettings.for_model("vit_small", **{"points_per_side": 16, **changes})


def _ellipse(shape, cy, cx, radius, rng):
    """A filled ellipse of mean radius ``radius`` px at (cy, cx), random axes ratio and angle."""
    a, b, angle = radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _render(labels, rng, blur=1.0):
    """Fluorescence-like uint8 image of a label map: each object its own brightness, blur, noise."""
    brightness = np.concatenate([[0.0], rng.uniform(0.5, 1.0, labels.max())]).astype(np.float32)
    image = ndi.gaussian_filter(brightness[labels], blur) + 0.1 + rng.normal(0, 0.03, labels.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _nuclei(shape, n, seed, fixed=(), gap=14):
    """uint8 image and int32 label map of ``n`` nuclei of 12-20 px diameter, at least ``gap``
    px apart; ``fixed`` (cy, cx) centres are placed first (e.g. on core borders)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    placed: list[tuple[float, float, float]] = []
    tries = 0
    while len(placed) < n and tries < 100_000:
        tries += 1
        radius = rng.uniform(6, 10)
        if len(placed) < len(fixed):
            cy, cx = fixed[len(placed)]
        else:
            cy, cx = rng.uniform(2 * radius, shape[0] - 2 * radius), rng.uniform(2 * radius, shape[1] - 2 * radius)
            if any((cy - y) ** 2 + (cx - x) ** 2 < (radius + r + gap) ** 2 for y, x, r in placed):
                continue
        placed.append((cy, cx, radius))
        labels[_ellipse(shape, cy, cx, radius, rng)] = len(placed)
    return _render(labels, rng), labels


def _masks(records):
    return [r["segmentation"] if isinstance(r["segmentation"], np.ndarray) else rle_to_mask(r["segmentation"])
            for r in records]


def _match(masks, labels, threshold=0.5):
    """One-to-one matching of masks to labelled objects by IoU >= threshold (greedy, best first).

    Returns:
        (object id -> mask index, object id -> indices of every mask with IoU >= threshold).
    """
    areas = np.bincount(labels.ravel())
    candidates, hits = [], {}
    for k, mask in enumerate(masks):
        ids, counts = np.unique(labels[mask], return_counts=True)
        for obj, inter in zip(ids, counts):
            iou = inter / (mask.sum() + areas[obj] - inter)
            if obj and iou >= threshold:
                candidates.append((iou, k, int(obj)))
                hits.setdefault(int(obj), []).append(k)
    matched, used = {}, set()
    for _, k, obj in sorted(candidates, reverse=True):
        if obj not in matched and k not in used:
            matched[obj] = k
            used.add(k)
    return matched, hits


def _box_overlap(a, b):
    ax, ay, aw, ah = a["bbox"]
    bx, by, bw, bh = b["bbox"]
    return ax <= bx + bw and bx <= ax + aw and ay <= by + bh and by <= ay + ah


# -- 1. the test ----------------------------------------------------------------------


def test_small_objects_on_a_large_image_found_by_tiles_not_untiled(sam):
    """768 x 768 px, ~100 nuclei of 12-20 px (some centred on core borders and corners): the
    tiles see them at native resolution, the untiled run at a third of it."""
    borders = [(192, 100), (384, 300), (576, 650), (100, 384), (192, 192), (384, 576), (650, 192), (576, 576)]
    image, labels = _nuclei((768, 768), n=100, seed=0, fixed=borders)
    settings = _settings(output_mode="uncompressed_rle")

    tiled_gen = TiledAutomaticMaskGenerator(sam, settings=settings)
    tiled = tiled_gen.generate(image)
    untiled = SamAutomaticMaskGenerator(sam, settings=settings).generate(image)
    assert len(tiled_gen.grid) == 16
    n_objects = int(labels.max())

    tiled_masks = _masks(tiled)
    tiled_match, tiled_hits = _match(tiled_masks, labels)
    untiled_match, _ = _match(_masks(untiled), labels)
    tiled_recall, untiled_recall = len(tiled_match) / n_objects, len(untiled_match) / n_objects
    print(f"\n{n_objects} objects: tiled recall {tiled_recall:.2f} ({len(tiled)} masks), "
          f"untiled recall {untiled_recall:.2f} ({len(untiled)} masks)")
    assert tiled_recall >= 0.9
    assert untiled_recall <= tiled_recall / 2

    for index, (cy, cx) in enumerate(borders, start=1):  # the objects on core borders: found
        assert index in tiled_match, f"object on a core border at {(cy, cx)} not found"
    # No duplicate at tile borders: no object matched by masks from two tiles, and no two kept
    # masks from different tiles with IoU > 0.5. (Within one tile the inner generator keeps,
    # as the untiled one does, a nucleus and the mask of it with its neighbour: not a tile effect.)
    for obj, ks in tiled_hits.items():
        assert len({tuple(tiled[k]["crop_box"]) for k in ks}) == 1, f"object {obj} found by two tiles"
    for a in range(len(tiled)):
        for b in range(a + 1, len(tiled)):
            if tiled[a]["crop_box"] == tiled[b]["crop_box"] or not _box_overlap(tiled[a], tiled[b]):
                continue
            inter = np.count_nonzero(tiled_masks[a] & tiled_masks[b])
            union = np.count_nonzero(tiled_masks[a] | tiled_masks[b])
            assert inter / union <= 0.5, f"duplicate across tiles: {tiled[a]['bbox']} and {tiled[b]['bbox']}"
    # Records in the full frame: RLE of the full image, area and inclusive box of the mask.
    for record, mask in zip(tiled, tiled_masks):
        assert record["segmentation"]["size"] == [768, 768]
        assert record["area"] == mask.sum()
        x0, y0, w, h = record["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x0, y0, x0 + w, y0 + h) == (cols.min(), rows.min(), cols.max(), rows.max())


# -- 2. full-frame RLE from a crop mask -------------------------------------------------------


def test_crop_mask_to_rle_equals_pycocotools_of_the_full_mask():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    cases = []
    for _ in range(30):
        height, width = rng.integers(1, 40, size=2)
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        cases.append(((int(height), int(width)), (int(y0), int(x0)), rng.random((h, w)) < rng.uniform(0.1, 0.9)))
    # Masks touching every image edge: full crops, first/last rows and columns set, all-ones, all-zeros.
    full = np.ones((7, 9), bool)
    edges = np.zeros((7, 9), bool)
    edges[0], edges[-1], edges[:, 0], edges[:, -1] = True, True, True, True
    cases += [((7, 9), (0, 0), full), ((7, 9), (0, 0), edges), ((7, 9), (0, 0), ~full),
              ((10, 12), (3, 3), full), ((10, 12), (3, 0), edges), ((10, 12), (0, 3), edges[:, :5])]
    for (height, width), (y0, x0), mask in cases:
        image_mask = np.zeros((height, width), bool)
        image_mask[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
        rle = crop_mask_to_rle(mask, (y0, x0), (height, width))
        expected = mask_utils.encode(np.asfortranarray(image_mask.astype(np.uint8)))
        ours = mask_utils.frPyObjects(rle, height, width)
        assert ours["counts"] == expected["counts"], ((height, width), (y0, x0))
        assert rle["size"] == [height, width] and sum(rle["counts"]) == height * width
        np.testing.assert_array_equal(rle_to_mask(rle), image_mask)

    with pytest.raises(ValueError, match="does not lie inside"):
        crop_mask_to_rle(np.ones((4, 4), bool), (8, 0), (10, 10))
    with pytest.raises(ValueError, match="2-D"):
        crop_mask_to_rle(np.ones((1, 4, 4), bool), (0, 0), (10, 10))


# -- 3. one tile: the plain generator ---------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [dict(output_mode="binary_mask"), dict(output_mode="coco_rle", crop_n_layers=1, min_mask_region_area=30)],
)
def test_single_tile_gives_the_plain_generators_records(sam, changes):
    image, _ = _nuclei((200, 256), n=12, seed=5)
    settings = _settings(**changes)
    tiled_gen = TiledAutomaticMaskGenerator(sam, settings=settings)
    tiled = tiled_gen.generate(image)
    plain = SamAutomaticMaskGenerator(sam, settings=settings).generate(image)
    assert len(tiled_gen.grid) == 1
    assert len(plain) >= 5
    assert len(tiled) == len(plain)
    for ours, theirs in zip(tiled, plain):
        assert list(ours) == list(theirs)
        for key in theirs:
            if key == "segmentation" and isinstance(theirs[key], np.ndarray):
                np.testing.assert_array_equal(ours[key], theirs[key])
            else:
                assert ours[key] == theirs[key], key


# -- 4. objects across core borders; the merge rule for large objects -------------------------


def test_object_across_a_core_border_is_found_once_and_whole(sam):
    """Nuclei of about 26 px centred on the core border x = 192 (one on a core corner) come out
    once, and whole: as the plain generator segments them on a 256 px crop centred on them.

    A cut nucleus would keep about half of its pixels (IoU about 0.5). The bar is 0.85, not
    0.9: vit_small's masks of a 26 px nucleus differ from the drawn ellipse by about a pixel
    all round (IoU 0.87 to 0.95 here, 0.86 to 0.96 on other renderings), and the plain
    generator's mask on a crop centred on the nucleus differs from the tile's by as much
    (other prompts, other context).
    """
    rng = np.random.default_rng(7)
    shape = (384, 448)
    labels = np.zeros(shape, np.int32)
    centres = [(60, 192), (192, 190), (300, 195), (192, 330)]
    for index, (cy, cx) in enumerate(centres, start=1):
        labels[_ellipse(shape, cy, cx, 13, rng)] = index
    image = _render(labels, rng)
    settings = _settings()
    gen = TiledAutomaticMaskGenerator(sam, settings=settings)
    masks = _masks(gen.generate(image))
    plain = SamAutomaticMaskGenerator(sam, settings=settings)
    for obj, (cy, cx) in enumerate(centres, start=1):
        truth = labels == obj
        ious = [np.count_nonzero(m & truth) / np.count_nonzero(m | truth) for m in masks]
        found = [k for k, iou in enumerate(ious) if iou >= 0.5]
        assert len(found) == 1, f"object {obj} at {(cy, cx)}: IoUs {sorted(ious)[-3:]}"
        assert ious[found[0]] >= 0.85, f"object {obj}: IoU {ious[found[0]]:.3f} with the ground truth"
        y0, x0 = min(max(cy - 128, 0), shape[0] - 256), min(max(cx - 128, 0), shape[1] - 256)
        crop_masks = _masks(plain.generate(image[y0 : y0 + 256, x0 : x0 + 256]))
        tiled_crop = masks[found[0]][y0 : y0 + 256, x0 : x0 + 256]
        best = max(np.count_nonzero(m & tiled_crop) / np.count_nonzero(m | tiled_crop) for m in crop_masks)
        assert best >= 0.85, f"object {obj}: IoU {best:.3f} with the plain generator's mask on a crop around it"


def _oracle(labels_in_crop_order):
    """An inner generator that segments perfectly: every label of the crop it is given (the
    image is a label map; its grey value is the label) is one mask, as the plain generator
    would return it (crop frame, uncompressed RLE)."""
    import torch

    def generate_iter(rgb, contrast_limits=None, *, image_embedding=None):
        assert image_embedding is not None and tuple(image_embedding.original_size) == rgb.shape[:2]
        labels_in_crop_order.append(rgb.shape[:2])
        crop = rgb[..., 0]
        records = []
        for value in np.unique(crop[crop > 0]):
            mask = torch.from_numpy(crop == value)[None]
            x0, y0, x1, y1 = batched_mask_to_box(mask)[0].tolist()
            records.append({
                "segmentation": mask_to_rle(mask)[0], "area": int(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": 0.9, "point_coords": [[(x0 + x1) / 2, (y0 + y1) / 2]], "stability_score": 0.95,
                "crop_box": [0, 0, crop.shape[1], crop.shape[0]],
            })
        yield AmgProgress(1, 1, 0, 1, len(records))
        return records

    return generate_iter


def test_merge_rule_with_a_perfect_inner_segmenter(sam):
    """The rule itself, with an inner generator that segments every object it sees exactly.

    512 x 512 px, tiles of 256 px, halo 32: cores [0, 192), [192, 384), [384, 512) on each
    axis; crops [0, 256), [160, 416), [256, 512) (the last shifted inwards).
    """
    shape = (512, 512)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint8)
    small = [(100, 192), (192, 192), (300, 383), (383, 100)]  # on core borders and a core corner
    for value, (cy, cx) in enumerate(small, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10**2] = value
    # Centred in core column 1 (x = 370), reaching 50 px: beyond the halo past that core (cut in its
    # crop [160, 416)), but whole in the shifted crop of column 2, [256, 512).
    labels[(yy - 100) ** 2 + (xx - 370) ** 2 <= 50**2] = 10
    # Longer than any crop: a bar across the bottom row of tiles, cut in every crop.
    labels[450:490, 10:500] = 20
    calls: list = []
    gen = TiledAutomaticMaskGenerator(sam, settings=_settings(output_mode="binary_mask"))
    gen._amg.generate_iter = _oracle(calls)
    records = gen.generate(labels)
    assert len(calls) == len(gen.grid) == 9
    masks = _masks(records)
    values = [np.unique(labels[m]) for m in masks]
    assert all(len(v) == 1 and v[0] > 0 for v in values), "every kept mask lies inside one object"
    by_object: dict[int, list[int]] = {}
    for k, v in enumerate(values):
        by_object.setdefault(int(v[0]), []).append(k)

    for value in [1, 2, 3, 4, 10]:  # found once, whole
        assert len(by_object[value]) == 1, value
        np.testing.assert_array_equal(masks[by_object[value][0]], labels == value)
    # The bar: pieces clipped to the cores of the tiles that see it, disjoint, covering it all.
    pieces = [masks[k] for k in by_object[20]]
    assert len(pieces) == 3
    assert np.array_equal(np.sum(pieces, axis=0), labels == 20)
    assert sorted(records[k]["bbox"][0] for k in by_object[20]) == [10, 192, 384]


# -- 5. a given image embedding ----------------------------------------------------------------


def test_image_embedding_gives_the_same_records(sam):
    from napari_sam.utils.progress import drain

    image, _ = _nuclei((256, 224), n=10, seed=9)
    amg = SamAutomaticMaskGenerator(sam, settings=_settings(output_mode="uncompressed_rle", crop_n_layers=1))
    embedding = drain(amg.predictor.embedding_steps(image))
    plain = amg.generate(image)
    given = drain(amg.generate_iter(image, image_embedding=embedding))
    assert len(plain) >= 5
    assert given == plain
    # Proof that the embedding is used: a zero embedding changes the records.
    import dataclasses

    zero = dataclasses.replace(embedding, features=embedding.features * 0)
    assert drain(amg.generate_iter(image, image_embedding=zero)) != plain
    other = drain(amg.predictor.embedding_steps(image[:128]))
    with pytest.raises(ValueError, match="image of \\(H, W\\) \\(128, 224\\)"):
        drain(amg.generate_iter(image, image_embedding=other))


# -- 6. an embedding store ---------------------------------------------------------------------


class _MemoryStore:
    """A tiling.TileStoreProtocol in memory, counting what it is asked."""

    def __init__(self):
        self.embeddings = {}
        self.checked = []

    def check_image(self, grid, dtype):
        self.checked.append((grid.image_shape, np.dtype(dtype)))

    def load(self, plane_index, tile, limits, pixels):
        return self.embeddings.get((plane_index, tile.index, limits))

    def save(self, plane_index, tile, limits, pixels, embedding):
        self.embeddings[(plane_index, tile.index, limits)] = embedding


def test_a_second_run_reads_every_tile_from_the_store(sam):
    image, _ = _nuclei((384, 384), n=25, seed=11)
    image16 = image.astype(np.uint16) * 200  # a non-uint8 image: one shared display mapping
    store = _MemoryStore()
    first_gen = TiledAutomaticMaskGenerator(sam, settings=_settings(output_mode="uncompressed_rle"), store=store)
    first = first_gen.generate(image16, plane_index=2)
    assert first_gen.embeddings.computed == [0, 1, 2, 3] and first_gen.embeddings.loaded == []
    assert len(store.embeddings) == 4 and {key[0] for key in store.embeddings} == {2}
    assert len(first) >= 15

    second_gen = TiledAutomaticMaskGenerator(sam, settings=_settings(output_mode="uncompressed_rle"), store=store)
    second = second_gen.generate(image16, plane_index=2)
    assert second_gen.embeddings.computed == [] and second_gen.embeddings.loaded == [0, 1, 2, 3]
    assert second == first
    assert store.checked == [((384, 384), np.dtype(np.uint16))] * 2


class _LazyImage:
    """An array that is only ever sliced (like a zarr or dask array), logging each read."""

    def __init__(self, array):
        self._array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self._array[key]


def test_lazy_image_is_read_one_crop_at_a_time(sam):
    image, _ = _nuclei((384, 384), n=25, seed=11)
    lazy = _LazyImage(image.astype(np.uint16) * 200)
    gen = TiledAutomaticMaskGenerator(sam, settings=_settings(points_per_side=8, output_mode="coco_rle"))
    records = gen.generate(lazy, contrast_limits=(0, 255 * 200))
    direct = gen.generate(np.asarray(lazy._array), contrast_limits=(0, 255 * 200))
    assert records == direct and len(records) >= 5
    crops = [tile.crop_slices for tile in gen.grid]
    assert lazy.reads and all(key in crops for key in lazy.reads)  # crops only: no whole-image read


# -- 7. progress and cancel ---------------------------------------------------------------------


def test_progress_over_tiles_and_cancel(sam):
    image, _ = _nuclei((384, 384), n=20, seed=13)
    gen = TiledAutomaticMaskGenerator(sam, settings=_settings(points_per_side=8, points_per_batch=16))
    steps = list(_progress(gen.generate_iter(image)))
    batches = [p for p in steps if p.stage == "masks"]
    assert all(isinstance(p, TiledAmgProgress) for p in steps)
    assert [p.done for p in batches] == list(range(1, 17))  # 4 tiles x 4 batches of 16 points
    assert {p.total for p in steps} == {16} and {p.n_tiles for p in steps} == {4}
    assert [p.tile_index for p in batches] == [t for t in range(4) for _ in range(4)]
    embedding_steps = [p for p in steps if p.stage == "embedding"]
    assert {p.tile_index for p in embedding_steps} == {0, 1, 2, 3}
    assert batches[-1].fraction == 1.0
    assert batches[-1].masks_kept >= batches[0].masks_kept

    # Cancel in the second tile: the generator stops there and releases the image.
    run = gen.generate_iter(image)
    for progress in run:
        if progress.tile_index == 1 and progress.stage == "masks":
            break
    run.close()
    assert gen.embeddings.computed == [0, 1]
    assert not gen.predictor.is_image_set
    with pytest.raises(StopIteration):
        next(run)


def _progress(generator):
    """Yield the generator's progress values and check that it returns records."""
    while True:
        try:
            yield next(generator)
        except StopIteration as stop:
            assert isinstance(stop.value, list)
            return


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(sam):
    with pytest.raises(ValueError, match="halo"):
        TiledAutomaticMaskGenerator(sam, tile_shape=64, halo=32)
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        TiledAutomaticMaskGenerator(sam, pred_iou_thresh=2.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        TiledAutomaticMaskGenerator(sam, points_per_sides=8)
    gen = TiledAutomaticMaskGenerator(sam, settings=_settings())
    assert gen.tile_shape == (256, 256) and gen.halo == (32, 32)
    with pytest.raises(ValueError, match="HxWx3"):
        gen.generate(np.zeros((300, 300, 2), np.uint8))
