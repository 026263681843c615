"""napari_sam.volume on synthetic 16-bit stacks (benchmarks/bench_volume.py's make_volume) with
the bundled vit_small: propagation from one click, anchors, automatic 3-D, linking, errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_sam
from napari_sam import volume as V
from napari_sam.utils.progress import drain

_spec = importlib.util.spec_from_file_location(
    "bench_volume", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_volume.py")
bench = sys.modules.setdefault("bench_volume", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def data():
    return bench.make_volume(seed=0)


@pytest.fixture(scope="module")
def predictor():
    return napari_sam.SamPredictor(napari_sam.build_sam("vit_small"))


@pytest.fixture(scope="module")
def embeddings(data, predictor):
    """Every slice's embedding, computed once (with the volume-wide contrast mapping)."""
    volume, _ = data
    rgb = V.volume_to_rgb(volume)
    return {z: drain(predictor.embedding_steps(rgb(z))) for z in range(len(volume))}


def cached(embeddings):
    def embed(index):
        if False:
            yield
        return embeddings[index]
    return embed


def propagate_from_click(predictor, embeddings, labels, label, settings=None):
    z, point = bench.middle_click(labels, label)
    predictor.set_image_embedding(embeddings[z])
    masks, scores, logits = predictor.predict(point_coords=point, point_labels=np.ones(1), multimask_output=True)
    best = int(np.argmax(scores))
    return drain(V.propagation_steps(predictor, len(labels), {z: masks[best]}, cached(embeddings), settings,
                                     {z: logits[best]}))


def test_exports():
    assert napari_sam.segment_volume is V.segment_volume
    assert napari_sam.segment_volume_automatic is V.segment_volume_automatic


def test_propagation_from_one_click_reaches_the_goals(data, predictor, embeddings):
    _, labels = data
    ious = []
    for label in range(1, int(labels.max()) + 1):
        result = propagate_from_click(predictor, embeddings, labels, label)
        ious.append(V.iou(result.masks, labels == label))
        assert max(bench.end_errors(result.masks, labels, label)) <= 2, (label, result.stopped)
    assert np.mean(ious) >= 0.80, ious


def test_segment_volume_public_path(data, predictor):
    """One object (touching a neighbour) through segment_volume: IoU, ends, progress, dtype and shape."""
    volume, labels = data
    z, point = bench.middle_click(labels, 2)
    seen = []
    mask = napari_sam.segment_volume(volume, z, point_coords=point, point_labels=[1], model=predictor,
                                     progress=seen.append)
    assert mask.dtype == bool and mask.shape == volume.shape
    assert V.iou(mask, labels == 2) >= 0.8
    assert max(bench.end_errors(mask, labels, 2)) <= 2
    assert seen and all(isinstance(p, V.VolumeProgress) and p.done <= p.total for p in seen)
    assert seen[-1].done == seen[-1].total


def test_anchors_are_never_overwritten_and_gaps_are_filled(data, predictor, embeddings):
    _, labels = data
    from scipy.ndimage import binary_erosion

    anchors = {z: binary_erosion(labels[z] == 1, iterations=2) for z in (7, 15)}
    result = drain(V.propagation_steps(predictor, len(labels), anchors, cached(embeddings)))
    for z, mask in anchors.items():
        np.testing.assert_array_equal(result.masks[z], mask)
        assert z not in result.slices
    assert all(result.masks[z].any() for z in range(8, 15))
    assert V.iou(result.masks[8:15], labels[8:15] == 1) >= 0.6


def test_propagation_can_be_cancelled_between_steps(data, predictor):
    volume, labels = data
    z, point = bench.middle_click(labels, 3)
    steps = V.segment_volume_steps(volume, z, point_coords=point, model=predictor)
    first = [next(steps) for _ in range(3)]
    steps.close()
    assert all(isinstance(p, V.VolumeProgress) for p in first)


def test_automatic_volume_gives_one_id_per_object(data, predictor):
    volume, labels = data
    settings = napari_sam.AmgSettings.for_model("vit_small", **bench.AUTOMATIC_SETTINGS)
    found, table = napari_sam.segment_volume_automatic(volume, model=predictor, settings=settings, return_table=True)
    assert found.dtype == np.uint32 and found.shape == volume.shape
    matched, n_found, extra = bench.match_objects(found, labels)
    truth = int(labels.max())
    assert matched / truth >= 0.8
    assert extra / truth < 0.1
    assert table["label"] == sorted(int(i) for i in np.unique(found) if i)
    assert all(v > 0 for v in table["voxels"])


def test_link_slices_closes_gaps_and_drops_short_objects():
    shape = (32, 32)
    yy, xx = np.mgrid[:32, :32]
    disc = lambda cy, cx, r: (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # noqa: E731
    slices = []
    for z in range(8):
        records = [(disc(8, 8 + z, 5), 0.9)]  # drifts; missing on slice 3 (a gap of one)
        if z == 3:
            records = []
        records.append((disc(24, 24, 6), 0.8))  # still
        if z == 5:
            records.append((disc(24, 8, 3), 0.5))  # one slice only: dropped
        slices.append(records[::-1] if z % 2 else records)
    labels, table = V.link_slices(slices, shape, V.LinkSettings(max_gap=1, min_extent=2))
    assert sorted(table["label"]) == [1, 2]
    drifting = labels[0][8, 8]
    assert all(labels[z][8, 8 + z] == drifting for z in range(8))  # slice 3 filled by the gap rule
    assert len({labels[z][24, 24] for z in range(8)}) == 1
    assert labels[5][24, 8] == 0


def test_link_slices_joins_a_piece_given_besides_the_whole():
    """SAM often gives a piece of an object as well as the whole: the piece joins the object."""
    yy, xx = np.mgrid[:32, :32]
    whole = (yy - 16) ** 2 + (xx - 16) ** 2 <= 64
    piece = whole & (xx < 14)
    slices = [[(whole, 0.9)], [(piece, 0.6), (whole, 0.8)], [(whole, 0.9)]]
    labels, table = V.link_slices(slices, (32, 32))
    assert table["label"] == [1]
    assert all(np.array_equal(labels[z] == 1, whole) for z in range(3))


@pytest.mark.parametrize("call, match", [
    (lambda v: V.segment_volume(v[0], 0, point_coords=[[5, 5]]), "2-D image"),
    (lambda v: V.segment_volume(v, 40, point_coords=[[5, 5]]), "out of range"),
    (lambda v: V.segment_volume(v, 3, point_coords=[[500, 5]]), "outside the slice"),
    (lambda v: V.segment_volume(v, 3, box=[-50, -50, -10, -10]), "outside the slice"),
    (lambda v: V.segment_volume(v, 3), "needs a prompt"),
    (lambda v: V.segment_volume(v, 3, point_coords=np.zeros((0, 2))), "needs a prompt"),
    (lambda v: V.segment_volume(v, 3, point_labels=[1]), "without point_coords"),
    (lambda v: V.segment_volume(v, -1, point_coords=[[5, 5]]), "out of range"),
    (lambda v: V.segment_volume(v, 3, point_coords=[[5, 5]], axis=3), "axis 3"),
    (lambda v: V.segment_volume(v, 3, mask=np.ones((4, 4), bool)), "mask has shape"),
    (lambda v: V.segment_volume_automatic(v[0]), "2-D image"),
])
def test_errors(call, match):
    volume = np.zeros((6, 32, 32), dtype=np.uint16)
    with pytest.raises(ValueError, match=match):
        call(volume)


def test_one_contrast_mapping_for_the_whole_volume():
    volume = np.stack([np.full((8, 8), 100, np.uint16), np.full((8, 8), 1000, np.uint16)])
    volume[1, 0, 0] = 2000
    rgb = V.volume_to_rgb(volume, (0, 2000))
    assert rgb(0)[1, 1, 0] == round(100 / 2000 * 255) and rgb(1)[1, 1, 0] == round(1000 / 2000 * 255)
    assert V.volume_to_rgb(volume)(0).max() < V.volume_to_rgb(volume)(1).max()


def test_volume_slices_shapes_and_errors():
    slices = V.VolumeSlices(np.zeros((5, 16, 20, 3), np.uint8), 0)
    assert slices.rgb and len(slices) == 5 and slices.plane_shape == (16, 20) and slices.plane(2).shape == (16, 20, 3)
    slices = V.VolumeSlices(np.zeros((16, 20, 5)), 2)
    assert not slices.rgb and len(slices) == 5 and slices.plane_shape == (16, 20)
    assert slices.stack(np.zeros((5, 16, 20))).shape == (16, 20, 5)
    with pytest.raises(ValueError, match="axis 3"):
        V.VolumeSlices(np.zeros((4, 8, 8)), 3)


class LazyArray:
    """An array-like read slice by slice (as dask or zarr data of a napari layer); counts reads."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.array[key]


def test_engine_path_uses_its_cache_and_any_axis(data, predictor):
    """The plugin's path: a SamEngine (model, cache, lock), a lazy array, the mask as anchor, axis 2."""
    from napari_sam.interactive.engine import SamEngine

    volume, labels = data
    sub, truth = volume[1:13], labels[1:13] == 3  # object 3 ends mid-stack (true slices 2..10 here)
    engine = SamEngine(model=predictor.model)
    limits = V.volume_contrast_limits(volume)
    kwargs = dict(mask=truth[6], engine=engine, cache_key=lambda i: ("sub", i), contrast_limits=limits)
    lazy = LazyArray(sub)
    mask = drain(V.segment_volume_steps(lazy, 6, **kwargs))
    assert lazy.reads < 2 * len(sub)  # read slice by slice, never as a whole
    assert V.iou(mask, truth) >= 0.8
    computed = engine.embeddings_computed
    assert computed == len(engine.cache) >= 8
    moved = LazyArray(np.moveaxis(sub, 0, 2))
    again = drain(V.segment_volume_steps(moved, 6, axis=2, **kwargs))
    assert engine.embeddings_computed == computed  # every slice came from the cache
    np.testing.assert_array_equal(np.moveaxis(again, 2, 0), mask)
    assert not engine.lock._is_owned()
