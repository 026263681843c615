"""Core (Qt-free) interactive segmentation: prompts, slices, embedding cache, commits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_sam.interactive.history import CommitHistory, array_writer, next_free_id, plan_commit
from napari_sam.interactive.prompts import SliceSpec, build_prompts, rowcol_to_xy


def test_rowcol_to_xy_flips_axes():
    assert np.array_equal(rowcol_to_xy(np.array([[10, 20], [3.5, 7]])), [[20, 10], [7, 3.5]])
    with pytest.raises(ValueError, match="Nx2"):
        rowcol_to_xy(np.zeros((3, 3)))


def test_slice_spec_take_and_indices_3d_transposed():
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    spec = SliceSpec.from_position(data.shape, displayed=(2, 1), position=(2.4, 0, 0))
    plane = spec.take(data)
    assert plane.shape == (6, 5)
    assert np.array_equal(plane, data[2].T)
    mask = np.zeros((6, 5), bool)
    mask[1, 3] = True
    idx = spec.indices(mask)
    assert [int(i[0]) for i in idx] == [2, 3, 1]


def test_build_prompts_slices_boxes_and_outside_points():
    spec = SliceSpec.from_position((3, 50, 60), displayed=(1, 2), position=(1, 0, 0))
    points = np.array([[1, 10, 12], [1, 12, 14], [0, 5, 5], [1, 70, 5], [1, 40, 50]])
    labels = ["positive", "negative", "positive", "positive", "positive"]
    box = np.array([[1, 5, 5], [1, 5, 20], [1, 20, 20], [1, 20, 5]])
    out = build_prompts(spec, points, labels, [box])
    assert out.n_outside == 1
    assert len(out.objects) == 2
    boxed, free = out.objects
    assert np.array_equal(boxed.box, [5, 5, 20, 20])
    assert np.array_equal(boxed.point_coords, [[12, 10], [14, 12]])
    assert np.array_equal(boxed.point_labels, [1, 0])
    assert not boxed.multimask_output
    assert np.array_equal(free.point_coords, [[50, 40]]) and free.multimask_output


def test_negative_points_alone_make_no_object():
    spec = SliceSpec.for_2d((20, 20))
    assert build_prompts(spec, np.array([[3.0, 3.0]]), ["negative"]).objects == []


def test_commit_undo_redo_preserves_existing_labels():
    labels = np.zeros((2, 8, 8), np.uint16)
    labels[1, 0, 0] = 5
    spec = SliceSpec.from_position(labels.shape, (1, 2), (1, 0, 0))
    mask = np.zeros((8, 8), bool)
    mask[:3, :3] = True
    history = CommitHistory()
    write = array_writer(labels)
    edit = history.commit(plan_commit(labels, spec, [mask]), write)
    assert edit.ids == [6] and labels[1, 0, 0] == 5 and labels[1, 2, 2] == 6 and labels[0].max() == 0
    assert next_free_id(labels) == 7
    history.undo(write)
    assert labels[1, 2, 2] == 0 and labels[1, 0, 0] == 5
    history.redo(write)
    assert labels[1, 2, 2] == 6


def test_embedding_cache_is_bounded():
    torch = pytest.importorskip("torch")
    from napari_sam.interactive.engine import EmbeddingCache
    from napari_sam.predictor import ImageEmbedding

    cache = EmbeddingCache(max_bytes=3 * 1024)
    for i in range(5):
        cache.put(i, ImageEmbedding(torch.zeros(256), (1, 1), (1, 1)))
    assert len(cache) == 3 and 0 not in cache and 4 in cache


def test_engine_embedding_matches_predictor(checkpoint_factory, groceries):
    from napari_sam import SamPredictor, sam_model_registry
    from napari_sam.interactive.engine import SamEngine
    from napari_sam.interactive.prompts import ObjectPrompt

    model = sam_model_registry["vit_test"](checkpoint_factory("vit_test"))
    engine = SamEngine(model=model)
    embedding = engine.embed(groceries, key="k")
    assert engine.embed(groceries, key="k") is embedding and engine.embeddings_computed == 1
    predictor = SamPredictor(model)
    predictor.set_image(groceries)
    assert (embedding.features == predictor.features).all()
    obj = ObjectPrompt(np.array([[300.0, 200.0], [100.0, 100.0]]), np.array([1, 0]), np.array([50.0, 60, 400, 300]))
    (mask,) = engine.predict_objects(embedding, [obj])
    expected = predictor.predict(obj.point_coords, obj.point_labels, obj.box, multimask_output=False)[0][0]
    assert np.array_equal(mask, expected)


def test_core_imports_no_qt():
    code = (
        "import sys, napari_sam.interactive.engine, napari_sam.interactive.history, napari_sam._napari;"
        "bad=[m for m in ('napari','qtpy','PyQt5','magicgui') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_display_rgb_follows_contrast_limits():
    from napari_sam.interactive.engine import display_rgb

    photo = (np.arange(12 * 3).reshape(2, 6, 3) * 7).astype(np.uint8)
    assert display_rgb(photo, (0, 255), rgb=True) is not None
    assert np.array_equal(display_rgb(photo, (0, 255), rgb=True), photo)  # photos pass unchanged
    stretched = display_rgb(photo, (0, 127.5), rgb=True)
    assert stretched.max() == 255 and np.array_equal(stretched[0, 0], [0, 14, 28])
    rgba = np.dstack([photo, np.full(photo.shape[:2], 9, np.uint8)])
    assert np.array_equal(display_rgb(rgba, (0, 255), rgb=True), photo)
    gray16 = np.array([[200, 1700, 3200]], np.uint16)
    assert display_rgb(gray16, (200, 3200), rgb=False)[0, :, 0].tolist() == [0, 128, 255]
    floats = np.array([[-1.0, 0.0, 1.0]], np.float32)
    assert display_rgb(floats, (-1, 1), rgb=False)[0, :, 1].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="2-D grayscale"):
        display_rgb(photo, (0, 255), rgb=False)


class _SlowSpec:
    """A model choice whose load waits for ``release`` (a download in progress)."""

    precision = "fp32"

    def __init__(self, name: str, release=None) -> None:
        import threading

        self.name, self.release, self.started = name, release, threading.Event()

    def load(self, progress=None):
        self.started.set()
        if self.release is not None:
            assert self.release.wait(10), "the test never released the load"
        return f"model {self.name}"


def test_choosing_another_model_during_a_slow_load_does_not_wait_and_wins():
    """The GUI thread must not freeze on a download: set_spec returns at once, and the model
    loaded for the replaced choice is discarded."""
    import threading
    import time

    from napari_sam.interactive.engine import SamEngine

    release = threading.Event()
    slow, other = _SlowSpec("slow", release), _SlowSpec("other")
    engine = SamEngine(slow)
    result = {}
    loader = threading.Thread(target=lambda: result.setdefault("model", engine.ensure_model()))
    loader.start()
    assert slow.started.wait(10)
    start = time.perf_counter()
    engine.set_spec(other)  # while "slow" is still downloading
    assert time.perf_counter() - start < 1.0
    release.set()
    loader.join(10)
    assert result["model"] == "model other" and engine.model == "model other" and engine.spec is other
