"""Large images in the widgets: auto tiling, lazy tiles, the embeddings store (bundled vit_small, input 256 px)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

WAIT_MS = 120_000
POINT = (300, 400)  # (row, col) of the click: tile 7 of 16 (row 1, column 2 of the 4x4 grid)


def wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def click(layer, world_position):
    """A mouse click (press + release) at a world position on ``layer``."""
    from napari.utils._test_utils import read_only_mouse_event
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    kwargs = {"position": tuple(world_position), "modifiers": []}
    mouse_press_callbacks(layer, read_only_mouse_event(type="mouse_press", **kwargs))
    mouse_release_callbacks(layer, read_only_mouse_event(type="mouse_release", **kwargs))


@pytest.fixture(scope="module")
def vit_small():
    from napari_sam import build_sam

    return build_sam("vit_small")


@pytest.fixture(scope="module")
def slide(truck):
    """768 x 768 uint16 grey image (3x vit_small's input: "auto" tiles it into 4 x 4 tiles)."""
    grey = truck[200:968, 500:1268].astype(np.float32).mean(axis=2)
    return (grey * 64).astype(np.uint16)


@pytest.fixture
def open_widget(make_napari_viewer, vit_small):
    """(image, store=None) -> (viewer, image layer, widget) with vit_small."""

    def open_(image, store=None):
        from napari_sam._napari._widget import SamWidget

        viewer = make_napari_viewer()
        layer = viewer.add_image(image, name="slide", contrast_limits=(0, 16000))
        widget = SamWidget(viewer)
        if store is not None:
            widget.tiling.set(store=store)
        widget.set_model(vit_small)
        viewer.window.add_dock_widget(widget, name="Segment Anything")
        return viewer, layer, widget

    return open_


def tiled_reference(model, image, limits, point_rowcol, tile_shape=256, halo=32):
    """The best-of-3 mask of a TiledPredictor for one positive click (full frame)."""
    from napari_sam import TiledPredictor

    predictor = TiledPredictor(model, tile_shape, halo)
    predictor.set_image(image, contrast_limits=limits)
    masks, scores, _ = predictor.predict(np.array([point_rowcol[::-1]], float), np.array([1]))
    return masks[int(np.argmax(scores))]


def recording_progress(widget):
    """Record the status line at every progress message of the widget's jobs."""
    messages = []
    original = widget._on_progress

    def record(step):
        original(step)
        messages.append(widget._status.value)

    widget._on_progress = record
    return messages


def test_auto_tiling_embeds_only_the_clicked_tile(open_widget, qtbot, slide, vit_small):
    from napari_sam.interactive.engine import display_rgb

    viewer, image, widget = open_widget(slide)
    assert widget.tiling.mode.value == "auto"
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 0  # opening embeds nothing: tiles wait for prompts
    assert widget._status.value.startswith("Tiled: 16 tiles of 256 x 256 px (halo 32 px)"), widget._status.value

    messages = recording_progress(widget)
    click(widget.points_layer, POINT)
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 1
    assert messages and all(m.startswith("Computing the image embedding of tile 7 of 16: step") for m in messages)
    expected = tiled_reference(vit_small, slide, (0, 16000), POINT)
    current = widget.current_layer.data
    assert expected.any() and np.array_equal(current > 0, expected)
    assert "1 object(s)" in widget._status.value

    # Commit: the output Labels get the object in the full image frame.
    assert widget.commit() == [1]
    assert np.array_equal(widget.output_layer.data == 1, expected)

    # Tiling off: the whole slice is embedded once (resized to 256 px), as without tiling.
    widget.tiling.set(mode="off")
    click(widget.points_layer, POINT)
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 2
    whole = widget.engine.predict_objects(
        widget.engine.embed(display_rgb(slide, (0, 16000), False)), _click_objects(POINT)
    )[0]
    assert widget.engine.embeddings_computed == 3  # the reference embedding above, not the widget
    assert np.array_equal(widget.current_layer.data > 0, whole)
    assert not np.array_equal(whole, expected)


def _click_objects(point_rowcol):
    from napari_sam.interactive.prompts import ObjectPrompt

    return [ObjectPrompt(np.array([point_rowcol[::-1]], float), np.array([1]))]


def test_store_is_written_then_read_by_another_viewer_and_follows_contrast_limits(
    open_widget, qtbot, slide, tmp_path
):
    store = tmp_path / "slide.zarr"
    viewer, image, widget = open_widget(slide, store=store)
    click(widget.points_layer, POINT)
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 1 and (store / "zarr.json").is_file()
    first = widget.current_layer.data > 0
    assert first.any()

    image.contrast_limits = (0, 9000)  # another display mapping: another embedding of the tile
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 2
    second = widget.current_layer.data > 0
    image.contrast_limits = (0, 16000)  # back: no encoder work
    wait_idle(qtbot, widget)
    assert widget.engine.embeddings_computed == 2
    assert np.array_equal(widget.current_layer.data > 0, first)

    # A new viewer (a new session, the same pixels): both mappings come from the store.
    viewer2, image2, widget2 = open_widget(slide.copy(), store=store)
    messages = recording_progress(widget2)
    click(widget2.points_layer, POINT)
    wait_idle(qtbot, widget2)
    assert widget2.engine.embeddings_computed == 0 and messages == []
    assert np.array_equal(widget2.current_layer.data > 0, first)
    image2.contrast_limits = (0, 9000)
    wait_idle(qtbot, widget2)
    assert widget2.engine.embeddings_computed == 0
    assert np.array_equal(widget2.current_layer.data > 0, second)
    assert not widget2._status.is_error


def test_mismatched_store_says_what_differs_and_recompute_replaces_it(open_widget, qtbot, slide, tmp_path, vit_small):
    from napari_sam import EmbeddingStore

    store = tmp_path / "other-tiling.zarr"
    EmbeddingStore(store, vit_small, tile_shape=128, halo=16)  # a store of another tiling
    viewer, image, widget = open_widget(slide, store=store)
    wait_idle(qtbot, widget)
    assert widget._status.is_error
    message = widget._status.value
    assert "tile shape (128, 128) vs (256, 256)" in message and "Recompute mismatched embeddings" in message, message
    click(widget.points_layer, POINT)  # still refused, and the widget stays usable
    wait_idle(qtbot, widget)
    assert widget._status.is_error and not widget.busy
    assert widget.engine.embeddings_computed == 0 and not widget.current_layer.data.any()

    widget.tiling.recompute.value = True
    wait_idle(qtbot, widget)
    assert not widget._status.is_error and widget.engine.embeddings_computed == 1
    expected = tiled_reference(vit_small, slide, (0, 16000), POINT)
    assert np.array_equal(widget.current_layer.data > 0, expected)
    reopened = EmbeddingStore(store, vit_small)
    assert reopened.tile_shape == (256, 256) and reopened.halo == (32, 32)


def test_segment_api_tiles_and_uses_the_store(make_napari_viewer, slide, vit_small, tmp_path):
    import napari_sam
    from napari_sam._napari._session import session_for

    viewer = make_napari_viewer()
    image = viewer.add_image(slide, name="slide", contrast_limits=(0, 16000))
    viewer.add_points([POINT], name="prompts")
    store = tmp_path / "api.zarr"
    labels = napari_sam.segment(viewer, image, "prompts", model=vit_small, store=store)
    expected = tiled_reference(vit_small, slide, (0, 16000), POINT)
    assert np.array_equal(labels.data == 1, expected)
    engine = session_for(viewer).engine
    assert engine.embeddings_computed == 1
    with pytest.raises(ValueError, match="tiling must be one of"):
        napari_sam.segment(viewer, image, "prompts", tiling="sometimes")

    viewer2 = make_napari_viewer()
    image2 = viewer2.add_image(slide, name="slide", contrast_limits=(0, 16000))
    viewer2.add_points([POINT], name="prompts")
    labels2 = napari_sam.segment(viewer2, image2, "prompts", model=vit_small, store=store, commit=False)
    assert session_for(viewer2).engine.embeddings_computed == 0
    assert np.array_equal(labels2.data > 0, expected)


def test_automatic_widget_segments_a_large_slice_tile_by_tile(make_napari_viewer, qtbot, slide, vit_small, tmp_path):
    from napari_sam import EmbeddingStore, TiledAutomaticMaskGenerator
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget
    from napari_sam.interactive.automatic import records_to_labels

    image = slide[:512, :512].copy()  # 2x vit_small's input: "auto" tiles it into 3 x 3 tiles
    viewer = make_napari_viewer()
    viewer.add_image(image, name="slide", contrast_limits=(0, 16000))
    widget = AutomaticSegmentationWidget(viewer)
    widget.session.use_model(vit_small)
    store = tmp_path / "automatic.zarr"
    widget.tiling.set(store=store)
    for name, value in dict(points_per_side=6, pred_iou_thresh=0.5, stability_score_thresh=0.7).items():
        widget._settings[name].value = value
    messages = []
    original = widget._on_progress
    widget._on_progress = lambda progress: (original(progress), messages.append(widget._status.value))
    worker = widget.run()
    assert worker is not None
    with qtbot.waitSignal(worker.finished, timeout=300_000):
        pass
    assert not widget._status.is_error, widget._status.value
    layer = viewer.layers["slide automatic"]
    generator = TiledAutomaticMaskGenerator(vit_small, settings=widget.settings())
    records = generator.generate(image, (0, 16000))
    expected, _ = records_to_labels(records, image.shape)
    assert len(records) > 3 and np.array_equal(layer.data, expected)
    assert any(m.startswith("Slice 1/1, tile 9 of 9") for m in messages), messages[-3:]
    assert widget._progress.value == widget._progress.max
    # Every tile's embedding went to the store, under the layer's display mapping.
    assert EmbeddingStore(store, vit_small).completed((0.0, 16000.0)).sum() == 9
