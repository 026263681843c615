"""The Automatic segmentation widget end to end on a real image (small offline model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from napari_sam import SamAutomaticMaskGenerator
from napari_sam.amg_settings import AmgSettings, setting
from napari_sam.cli import build_parser
from napari_sam.interactive.automatic import records_to_labels
from napari_sam.interactive.engine import display_rgb
from napari_sam.models import ModelSpec, create_model

MANIFEST = Path(__file__).resolve().parents[2] / "napari.yaml"
KEEP_MANY = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(make_napari_viewer, npe2pm):
    with npe2pm.tmp_plugin(manifest=str(MANIFEST)):
        viewer = make_napari_viewer()
        viewer.add_image(data.coins()[:160, :200], name="coins")
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Automatic segmentation")
        widget.session.choose(ModelSpec("vit_test"))  # test-only: not in the model menu
        yield viewer, widget


def test_settings_have_reference_defaults_bounds_and_tooltips(widget):
    _, widget = widget
    fields = AmgSettings.tunable_fields()
    assert list(widget._settings) == [f.name for f in fields]
    for f in fields:
        control = widget._settings[f.name]
        assert control.value == pytest.approx(f.default, abs=1e-2)
        assert control.tooltip == f.help
        assert control.min == f.min
        assert control.max == f.max or (f.open_max and control.max < f.max)
        assert widget[f.name] is control
    assert widget._settings["crop_overlap_ratio"].value == pytest.approx(512 / 1500, abs=0.01)
    assert isinstance(widget.settings(), AmgSettings)


def test_thresholds_follow_the_model(widget):
    _, widget = widget
    widget._settings["points_per_side"].value = 20  # the user's choice survives a model change
    small = AmgSettings.model_overrides("vit_small")
    widget._picker._model.value = "vit_b"
    assert widget.settings().pred_iou_thresh == pytest.approx(0.88)
    widget._picker._model.value = "vit_small"  # the bundled model: its own, lower thresholds
    for name, value in small.items():
        assert getattr(widget.settings(), name) == pytest.approx(value)
    assert small["pred_iou_thresh"] < 0.88
    widget._picker._model.value = "vit_b"  # an official model: the reference's defaults again
    assert widget.settings().pred_iou_thresh == pytest.approx(0.88)
    assert widget.settings().stability_score_thresh == pytest.approx(0.95)
    assert widget.settings().box_nms_thresh == pytest.approx(0.7)
    assert widget.settings().points_per_side == 20


@dataclasses.dataclass(frozen=True)
class ExtendedSettings(AmgSettings):
    """AmgSettings plus one setting, declared in one place only."""

    extra_knob: float = setting(0.25, "A new setting declared once.", (0.0, 2.0))


def test_a_setting_added_in_one_place_appears_in_cli_and_widget(make_napari_viewer):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget

    help_text = build_parser(ExtendedSettings).format_help()
    assert "--extra-knob" in help_text and "A new setting declared once." in help_text
    viewer = make_napari_viewer()
    widget = AutomaticSegmentationWidget(viewer, settings_class=ExtendedSettings)
    control = widget["extra_knob"]
    assert control is widget._settings["extra_knob"]
    assert control.value == pytest.approx(0.25) and (control.min, control.max) == (0.0, 2.0)
    assert control.tooltip == "A new setting declared once."
    control.value = 1.5
    chosen = widget.settings()
    assert isinstance(chosen, ExtendedSettings) and chosen.extra_knob == pytest.approx(1.5)
    assert chosen.points_per_side == 32


def run_and_wait(widget, qtbot, **settings):
    for name, value in settings.items():
        widget._settings[name].value = value
    worker = widget.run()
    assert worker is not None
    with qtbot.waitSignal(worker.finished, timeout=300_000):
        pass
    return worker


def test_run_writes_one_labels_layer_with_features(widget, qtbot):
    viewer, widget = widget
    run_and_wait(widget, qtbot, **KEEP_MANY)
    layer = viewer.layers["coins automatic"]
    assert layer.data.shape == (160, 200)
    # The same masks as the generator run directly on the displayed image.
    image = viewer.layers["coins"]
    rgb = display_rgb(image.data, image.contrast_limits, False)
    generator = SamAutomaticMaskGenerator(create_model("vit_test"), settings=widget.settings(), **KEEP_MANY)
    records = generator.generate(rgb)
    assert len(records) > 5
    expected, _ = records_to_labels(records, rgb.shape[:2])
    np.testing.assert_array_equal(layer.data, expected)
    features = layer.features
    assert list(features["label"]) == list(range(1, len(records) + 1))
    np.testing.assert_allclose(features["predicted_iou"], [r["predicted_iou"] for r in records], rtol=1e-6)
    assert list(features["area"]) == [r["area"] for r in records]
    # Overlaps: the smallest mask is fully visible.
    smallest = int(np.argmin([r["area"] for r in records]))
    assert (layer.data[records[smallest]["segmentation"]] == smallest + 1).all()


def test_cancel_stops_between_batches_and_writes_nothing(widget, qtbot):
    viewer, widget = widget
    widget._settings["points_per_side"].value = 16
    widget._settings["points_per_batch"].value = 8
    worker = widget.run()
    with qtbot.waitSignal(worker.yielded, timeout=300_000):
        pass
    widget.cancel()
    with qtbot.waitSignal(worker.finished, timeout=300_000):
        pass
    assert "coins automatic" not in viewer.layers
    assert widget._status.value == "Cancelled."
    assert widget._progress.value < widget._progress.max
    assert widget._run.enabled and not widget._cancel.enabled


def test_all_slices_of_a_stack(make_napari_viewer, npe2pm, qtbot):
    with npe2pm.tmp_plugin(manifest=str(MANIFEST)):
        viewer = make_napari_viewer()
        coins = data.coins()[:96, :128].astype(np.uint16) * 16  # 12-bit range in uint16
        stack = np.stack([coins, np.fliplr(coins)])
        viewer.add_image(stack, name="stack", scale=(3.0, 0.5, 0.5))
        _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Automatic segmentation")
        widget.session.choose(ModelSpec("vit_test"))  # test-only: not in the model menu
        widget._all_slices.value = True
        run_and_wait(widget, qtbot, **{**KEEP_MANY, "points_per_side": 4})
        layer = viewer.layers["stack automatic"]
        assert layer.data.shape == stack.shape
        np.testing.assert_allclose(layer.scale, (3.0, 0.5, 0.5))
        assert layer.data[0].max() > 0 and layer.data[1].max() > 0
        # Ids continue across slices: no id is used on both slices.
        assert not set(np.unique(layer.data[0])[1:]) & set(np.unique(layer.data[1])[1:])
