"""Segment object in volume (project issue 26): the Segment Anything widget propagates the
current object through a 3-D stack in its background worker, commits it as one object (one
undo step), reports progress and can be cancelled. Bundled ``vit_small``, a synthetic 16-bit
stack of one ellipsoid "nucleus" on a noisy background."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

WAIT_MS = 180_000


def nucleus_stack(z: int = 11, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(16-bit ZYX stack, its bool ground truth): one textured ellipsoid "nucleus" spanning slices
    1..z-2 on an uneven, noisy background, and a dimmer neighbour that never touches it."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:z, :size, :size]
    t = (zz - z // 2) / (z / 2 - 0.6)
    radius = np.sqrt(np.clip(1 - t ** 2, 0, 1))
    truth = ((yy - 60) / (17 * radius + 1e-6)) ** 2 + ((xx - 50 - zz) / (13 * radius + 1e-6)) ** 2 <= 1.0
    other = (yy - 100) ** 2 / 14 ** 2 + (xx - 100) ** 2 / 12 ** 2 + (zz - z // 2) ** 2 / 4 ** 2 <= 1.0
    texture = 1 + 0.25 * ndimage.gaussian_filter(rng.normal(size=truth.shape), 2.0) * 6.0
    signal = ndimage.gaussian_filter((truth + 0.7 * other) * texture, (0.5, 1.0, 1.0))
    stack = 900 + 300 * xx / size + 2600 * signal + rng.normal(0, 180, truth.shape)
    return np.clip(stack, 0, 65535).astype(np.uint16), truth


@pytest.fixture(scope="module")
def small_model():
    from napari_sam import build_sam

    return build_sam("vit_small", device="cpu")


@pytest.fixture
def stack_widget(make_napari_viewer, small_model):
    from napari_sam._napari._widget import SamWidget

    stack, truth = nucleus_stack()
    viewer = make_napari_viewer()
    image = viewer.add_image(stack, name="nuclei", scale=(3.0, 1.0, 1.0))
    widget = SamWidget(viewer)
    widget.set_model(small_model)
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    viewer.dims.set_current_step(0, stack.shape[0] // 2)
    return viewer, image, widget, truth


def prompt_middle_slice(qtbot, viewer, widget):
    z = viewer.dims.current_step[0]
    widget.points_layer.add([[z, 60, 50 + z]])  # data (z, row, col); a positive point by default
    qtbot.waitUntil(lambda: not widget.busy and len(widget._current.masks) == 1, timeout=WAIT_MS)


def test_segment_object_in_volume_commits_one_object_and_undoes_in_one_step(qtbot, stack_widget):
    viewer, image, widget, truth = stack_widget
    prompt_middle_slice(qtbot, viewer, widget)
    messages = []
    worker = widget.segment_in_volume()
    assert worker is not None and widget.volume_worker is worker
    worker.yielded.connect(lambda progress: messages.append(widget._status.value))
    qtbot.waitUntil(lambda: widget.volume_worker is None, timeout=WAIT_MS)
    labels = widget.output_layer.data
    ids = np.unique(labels[labels > 0])
    assert len(ids) == 1, ids  # one object, one id through the stack
    found = labels == ids[0]
    slices = np.flatnonzero(found.any(axis=(1, 2)))
    assert len(slices) >= 5, slices  # more than the prompted slice
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.6, iou
    assert any("slice" in m for m in messages)  # progress in the status area
    assert "Committed label" in widget._status.value
    assert tuple(widget.output_layer.scale) == tuple(image.scale)  # anisotropic scale kept
    widget.undo()  # one step takes the whole object away
    assert not widget.output_layer.data.any()
    widget.redo()
    assert np.array_equal(widget.output_layer.data > 0, found)


def test_cancelled_volume_segmentation_commits_nothing(qtbot, stack_widget):
    viewer, image, widget, truth = stack_widget
    prompt_middle_slice(qtbot, viewer, widget)
    widget.engine.cache.clear()  # every slice needs its embedding: time to cancel
    worker = widget.segment_in_volume()
    aborted = []
    worker.aborted.connect(lambda: aborted.append(True))
    qtbot.waitUntil(lambda: widget._status.value.startswith("Segmenting the object"), timeout=WAIT_MS)
    assert widget.segment_in_volume() is None  # the same action cancels
    qtbot.waitUntil(lambda: widget.volume_worker is None, timeout=WAIT_MS)
    assert aborted and not widget.output_layer.data.any()
    assert "cancelled" in widget._status.value


def test_volume_segmentation_needs_one_object_and_slices(qtbot, make_napari_viewer, small_model):
    from skimage import data

    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer()
    viewer.add_image(data.coins()[:96, :96])
    widget = SamWidget(viewer)
    widget.set_model(small_model)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget.segment_in_volume() is None and "Segment one object on a slice first" in widget._status.value
    widget.points_layer.add([[40, 40]])
    qtbot.waitUntil(lambda: not widget.busy and len(widget._current.masks) == 1, timeout=WAIT_MS)
    assert widget.segment_in_volume() is None and "no slices to propagate" in widget._status.value


def test_segment_script_with_volume_commits_the_object_through_the_stack(qtbot, make_napari_viewer, small_model):
    import napari_sam

    stack, truth = nucleus_stack()
    viewer = make_napari_viewer()
    image = viewer.add_image(stack, name="nuclei")
    z = stack.shape[0] // 2
    viewer.dims.set_current_step(0, z)
    points = viewer.add_points([[z, 60, 50 + z]], name="prompts")
    labels = napari_sam.segment(viewer, image, points, model=small_model, volume=True)
    found = labels.data > 0
    assert len(np.unique(labels.data[found])) == 1
    assert (found & truth).sum() / (found | truth).sum() > 0.6
    def rectangle(r0, c0, r1, c1):
        return [[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]]

    boxes = viewer.add_shapes([rectangle(40, 40, 80, 80), rectangle(85, 85, 115, 115)], shape_type="rectangle")
    with pytest.raises(ValueError, match="one object"):  # two boxes are two objects
        napari_sam.segment(viewer, image, points, boxes, model=small_model, volume=True)
    with pytest.raises(ValueError, match="commits it"):
        napari_sam.segment(viewer, image, points, model=small_model, volume=True, commit=False)


def test_automatic_3d_objects_have_one_id_through_the_stack(qtbot, make_napari_viewer, small_model):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget

    stack, truth = nucleus_stack()
    viewer = make_napari_viewer()
    image = viewer.add_image(stack, name="nuclei", scale=(3.0, 1.0, 1.0))
    widget = AutomaticSegmentationWidget(viewer)
    widget.session.use_model(small_model)
    widget._settings["points_per_side"].value = 8
    widget._settings["pred_iou_thresh"].value = 0.4
    widget._settings["stability_score_thresh"].value = 0.7
    widget._objects_3d.value = True
    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    data = widget.result_layer.data
    assert data.shape == stack.shape and tuple(widget.result_layer.scale) == tuple(image.scale)
    # the nucleus is one 3-D object: one id covers most of it, on most of its slices
    ids, counts = np.unique(data[truth & (data > 0)], return_counts=True)
    assert len(ids) >= 1
    best = ids[np.argmax(counts)]
    obj = data == best
    assert (obj & truth).sum() / (obj | truth).sum() > 0.5
    assert obj.any(axis=(1, 2)).sum() >= 5
    features = widget.result_layer.features
    assert {"first_slice", "last_slice", "voxels"} <= set(features.columns) and best in set(features["label"])
    assert "3-D objects" in widget._status.value


def test_embed_the_whole_stack_fills_the_cache_for_every_slice(qtbot, stack_widget):
    from napari_sam._napari._layers import current_slice
    from napari_sam.interactive.volume_object import StackSlices

    viewer, image, widget, truth = stack_widget
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    widget.engine.cache.clear()
    worker = widget.precompute_stack()
    assert worker is not None
    qtbot.waitUntil(lambda: widget._precompute_worker is None, timeout=WAIT_MS)
    assert widget._status.value.startswith("Stack embedded (11 new")
    spec = current_slice(viewer, image)
    stack = StackSlices(widget.engine, image.data, False, spec, 0, tuple(image.contrast_limits),
                        widget.session.data_key(image))
    assert all(stack.cache_key(i) in widget.engine.cache for i in range(len(stack)))
    # then propagation computes no embedding at all
    before = widget.engine.embeddings_computed
    prompt_middle_slice(qtbot, viewer, widget)
    widget.segment_in_volume()
    qtbot.waitUntil(lambda: widget.volume_worker is None, timeout=WAIT_MS)
    assert widget.engine.embeddings_computed == before and widget.output_layer.data.any()


def test_the_commit_message_stays_after_the_prompts_are_cleared(qtbot, stack_widget):
    viewer, image, widget, truth = stack_widget
    prompt_middle_slice(qtbot, viewer, widget)
    widget.commit()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    qtbot.wait(300)
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget._status.value.startswith("Committed label(s) 1")  # not "Embedding ready"
    prompt_middle_slice(qtbot, viewer, widget)  # new prompts: the current object is reported again
    assert widget._status.value.startswith("Current: 1 object")
