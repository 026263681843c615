"""The Segment Anything widget, driven as a person would (under Xvfb, small random-weight model)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def vit_test_model(checkpoint_factory):
    from napari_sam import sam_model_registry

    return sam_model_registry["vit_test"](checkpoint_factory("vit_test"))


@pytest.fixture
def open_widget(make_napari_viewer, vit_test_model):
    """Return a function: (image, **add_image kwargs) -> (viewer, image layer, widget)."""

    def open_(image, **kwargs):
        from napari_sam._napari._widget import SamWidget

        viewer = make_napari_viewer()
        layer = viewer.add_image(image, **kwargs)
        widget = SamWidget(viewer)
        widget.set_model(vit_test_model)
        viewer.window.add_dock_widget(widget, name="Segment Anything")
        return viewer, layer, widget

    return open_


def wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def click(layer, world_position, modifiers=()):
    """A mouse click (press + release) at a world position on ``layer``."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    kwargs = {"position": tuple(world_position), "modifiers": list(modifiers)}
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", **kwargs))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", **kwargs))


def drag(layer, start, end):
    """A mouse drag from ``start`` to ``end`` (world positions) on ``layer``."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", position=tuple(start)))
    for t in np.linspace(0, 1, 5)[1:]:
        position = tuple(np.asarray(start) + t * (np.asarray(end) - np.asarray(start)))
        mouse_move_callbacks(layer, read_only_mouse_event(type="mouse_move", is_dragging=True, position=position))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", position=tuple(end)))


def reference_mask(model, rgb, point_xy, point_labels, box_xyxy):
    from napari_sam import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image(rgb)
    masks, _, _ = predictor.predict(
        np.asarray(point_xy, float), np.asarray(point_labels), np.asarray(box_xyxy, float), multimask_output=False
    )
    return masks[0]


def test_points_and_box_end_to_end(open_widget, qtbot, groceries, vit_test_model):
    viewer, image, widget = open_widget(groceries)
    points, boxes = widget.points_layer, widget.shapes_layer
    assert points is not None and boxes is not None and points.mode == "add"
    assert widget.current_layer is not None and widget.output_layer is not None

    click(points, (200, 300))  # (row, col): positive
    click(points, (150, 420), modifiers=["Shift"])  # negative
    assert list(points.features["label"]) == ["positive", "negative"]
    assert points.face_color[0].tolist() == [0, 1, 0, 1] and points.face_color[1].tolist() == [1, 0, 0, 1]
    boxes.mode = "add_rectangle"
    drag(boxes, (100, 150), (350, 500))
    assert len(boxes.data) == 1
    wait_idle(qtbot, widget)

    expected = reference_mask(vit_test_model, groceries, [[300, 200], [420, 150]], [1, 0], [150, 100, 500, 350])
    current = widget.current_layer.data
    assert current.shape == groceries.shape[:2]
    assert np.array_equal(current > 0, expected)
    assert expected.any()
    assert widget.engine.embeddings_computed == 1

    # Moving a point re-predicts without a new embedding.
    points.data = np.array([[210.0, 310.0], [150.0, 420.0]])
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 1
    expected = reference_mask(vit_test_model, groceries, [[310, 210], [420, 150]], [1, 0], [150, 100, 500, 350])
    assert np.array_equal(widget.current_layer.data > 0, expected)


def test_commit_undo_redo_and_clear(open_widget, qtbot, groceries):
    viewer, image, widget = open_widget(groceries)
    points, output = widget.points_layer, widget.output_layer
    click(points, (250, 400))
    wait_idle(qtbot, widget)
    mask = widget.current_layer.data > 0
    assert mask.any()
    assert "1 object(s)" in widget._status.value and "not committed" in widget._status.value

    assert widget.commit() == [1]
    assert np.array_equal(output.data == 1, mask)
    assert len(points.data) == 0 and not widget.current_layer.data.any()  # prompts cleared

    widget.boxes_layer = None
    widget.shapes_layer.add_rectangles(np.array([[50, 50], [200, 250]]))
    wait_idle(qtbot, widget)
    second = widget.current_layer.data > 0
    assert widget.commit() == [2]
    assert (output.data == 2).sum() == (second & ~mask).sum()  # existing labels preserved

    widget.undo()
    assert not (output.data == 2).any() and np.array_equal(output.data == 1, mask)
    widget.undo()
    assert not output.data.any()
    widget.redo()
    assert np.array_equal(output.data == 1, mask)
    widget.redo()
    assert (output.data == 2).any()
    # The commits are in napari's own Labels history too.
    output.undo()
    assert not (output.data == 2).any()

    # Keys are bound on the viewer and on the prompt layers.
    bound = {str(k) for k in viewer.keymap}
    assert {"C", "Shift+C", "T", "U", "Shift+U"} <= bound, bound
    click(points, (100, 100))
    click(points, (120, 100))
    wait_idle(qtbot, widget)
    widget.clear_prompts()
    assert len(points.data) == 0


def test_polarity_toggle(open_widget, qtbot, groceries):
    viewer, image, widget = open_widget(groceries)
    points = widget.points_layer
    widget.toggle_polarity()
    click(points, (100, 100))
    click(points, (110, 100), modifiers=["Shift"])
    widget.toggle_polarity()
    click(points, (120, 100))
    assert list(points.features["label"]) == ["negative", "positive", "positive"]
    points.mode = "select"
    points.selected_data = {2}
    widget.toggle_polarity()
    assert list(points.features["label"]) == ["negative", "positive", "negative"]
    wait_idle(qtbot, widget)


def uint16_stack():
    """A real 3-D uint16 stack: skimage's cells image (12-bit range) repeated over 5 planes, shifted."""
    from skimage import data

    cell = data.cell().astype(np.float32)
    cell = (cell - cell.min()) / np.ptp(cell) * 3000 + 200  # 12-bit camera range
    planes = [np.roll(cell, 8 * z, axis=1) for z in range(5)]
    return np.stack(planes).astype(np.uint16)


def test_3d_uint16_anisotropic_two_slices(open_widget, qtbot, vit_test_model):
    stack = uint16_stack()
    scale, translate = (4.0, 0.5, 0.5), (10.0, -3.0, 7.0)
    viewer, image, widget = open_widget(stack, scale=scale, translate=translate, contrast_limits=(200, 3200))
    points, output = widget.points_layer, widget.output_layer
    for layer in (points, widget.shapes_layer, widget.current_layer, output):
        assert np.allclose(layer.scale, scale) and np.allclose(layer.translate, translate)
        assert layer.ndim == 3
    assert output.data.shape == stack.shape

    from napari_sam import SamPredictor

    ids = []
    for z, rowcol in ((1, (300, 200)), (3, (400, 450))):
        viewer.dims.set_point(0, translate[0] + scale[0] * z)
        world = (translate[0] + scale[0] * z, translate[1] + scale[1] * rowcol[0], translate[2] + scale[2] * rowcol[1])
        click(points, world)
        wait_idle(qtbot, widget)
        assert np.allclose(points.data[-1], (z, *rowcol))
        predictor = SamPredictor(vit_test_model)
        predictor.set_image(stack[z], contrast_limits=(200, 3200))
        masks, scores, _ = predictor.predict(np.array([rowcol[::-1]], float), np.array([1]))
        expected = masks[int(np.argmax(scores))]
        current = widget.current_layer.data
        assert np.array_equal(current[z] > 0, expected)
        assert not np.delete(current, z, axis=0).any()
        ids.append(widget.commit())
        assert np.array_equal(output.data[z] > 0, expected) or (output.data[z] > 0).sum() >= expected.sum()
    assert ids == [[1], [2]]
    assert (output.data[1] == 1).any() and (output.data[3] == 2).any() and not output.data[[0, 2, 4]].any()
    assert widget.engine.embeddings_computed == 2
    # Transforms of every layer are untouched.
    assert np.allclose(image.scale, scale) and np.allclose(output.scale, scale)


def test_newer_request_supersedes_stale_one(open_widget, qtbot):
    stack = uint16_stack()
    viewer, image, widget = open_widget(stack, contrast_limits=(200, 3200))
    wait_idle(qtbot, widget)
    shown = []
    original = widget._current.show
    widget._current.show = lambda image, spec, masks: (shown.append(spec.index[0]), original(image, spec, masks))[1]
    widget.points_layer.data = np.array([[1, 300, 200], [3, 400, 450]], float)
    widget._timer.stop()
    viewer.dims.set_point(0, 1)
    widget.request_prediction()  # needs the embedding of plane 1
    viewer.dims.set_point(0, 3)
    widget.request_prediction()  # plane 3: the plane-1 request is stale
    wait_idle(qtbot, widget)
    assert shown == [3]
    assert widget.current_layer.data[3].any() and not widget.current_layer.data[1].any()


def test_contrast_change_re_embeds(open_widget, qtbot):
    stack = uint16_stack()[0]
    viewer, image, widget = open_widget(stack, contrast_limits=(200, 3200))
    click(widget.points_layer, (300, 300))
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 1
    before = widget.current_layer.data.copy()
    image.contrast_limits = (1000, 2000)
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 2
    image.contrast_limits = (200, 3200)  # back: the cached embedding is reused
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 2
    assert np.array_equal(widget.current_layer.data, before)


def test_out_of_image_points_ignored(open_widget, qtbot, groceries):
    viewer, image, widget = open_widget(groceries)
    click(widget.points_layer, (-50, 100))
    wait_idle(qtbot, widget)
    assert not widget.current_layer.data.any()
    assert len(widget.points_layer.data) == 1  # the user's point is kept


def test_bad_checkpoint_is_a_notification(open_widget, qtbot, groceries, tmp_path, monkeypatch):
    viewer, image, widget = open_widget(groceries)
    messages = []
    monkeypatch.setattr("napari_sam._napari._session.show_error", messages.append)  # one error path
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    widget._picker._checkpoint.value = bad
    widget._picker._model.value = "file"
    click(widget.points_layer, (100, 100))
    wait_idle(qtbot, widget)
    assert messages and "bad.pth" in messages[-1]
    assert len(widget.points_layer.data) == 1 and widget.output_layer in viewer.layers


def test_segment_api(open_widget, qtbot, groceries, vit_test_model):
    import napari_sam

    viewer, image, widget = open_widget(groceries)
    click(widget.points_layer, (250, 400))
    wait_idle(qtbot, widget)
    expected = widget.current_layer.data > 0
    labels = napari_sam.segment(viewer)
    assert labels is widget.output_layer
    assert np.array_equal(labels.data > 0, expected)
    widget.undo()  # the script's commit is in the widget's history
    assert not labels.data.any()


def test_segment_api_without_widget(make_napari_viewer, groceries, vit_test_model):
    import napari_sam

    viewer = make_napari_viewer()
    image = viewer.add_image(groceries, scale=(2, 2))
    points = viewer.add_points([[250, 400]], scale=(2, 2))
    labels = napari_sam.segment(viewer, points_layer=points, model=vit_test_model)
    assert labels.data.shape == groceries.shape[:2] and labels.data.max() == 1
    assert np.allclose(labels.scale, image.scale)
    # The model given once is the viewer's model from then on, and the embedding is reused.
    from napari_sam._napari._session import session_for

    engine = session_for(viewer).engine
    assert engine.model is vit_test_model and engine.embeddings_computed == 1
    napari_sam.segment(viewer, points_layer=points, commit=False)
    assert engine.embeddings_computed == 1
    other = make_napari_viewer()
    other.add_image(groceries)
    other_points = other.add_points([[250, 400]])
    with pytest.raises(ValueError, match="No model"):
        napari_sam.segment(other, points_layer=other_points)


def test_responsiveness_while_embedding(open_widget, qtbot, truck):
    """The event loop keeps ticking while an embedding is computed (loose bound, small model)."""
    from qtpy.QtCore import QElapsedTimer, QTimer

    viewer, image, widget = open_widget(truck)
    wait_idle(qtbot, widget)
    widget.engine.cache.clear()
    gaps, clock = [], QElapsedTimer()
    clock.start()
    last = [clock.elapsed()]

    def tick():
        now = clock.elapsed()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    click(widget.points_layer, (500, 800))
    wait_idle(qtbot, widget)
    timer.stop()
    assert widget.engine.embeddings_computed >= 1
    assert len(gaps) > 3
    # Generous: this machine is shared; the strict 100 ms figure comes from the benchmark.
    assert max(gaps) < 2000, max(gaps)
