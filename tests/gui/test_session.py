"""One session per viewer: both widgets and napari_sam.segment share the model and its menu."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

pytestmark = pytest.mark.gui


@pytest.fixture
def menu_test_type(monkeypatch, tmp_path):
    """A user-facing type without weights: choosing it never downloads anything."""
    from napari_sam.models import ModelEntry, SamConfig, register_model, unregister_model

    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NAPARI_SAM_MIRROR", "http://127.0.0.1:9")  # a download attempt fails locally
    config = SamConfig(32, 2, 2, (1,), img_size=128, window_size=4, prompt_embed_dim=32, decoder_mlp_dim=64,
                       decoder_num_heads=2, iou_head_hidden_dim=32, mask_in_chans=4)
    yield register_model(ModelEntry("vit_menu_test", config, "Menu test model", amg_thresholds={"box_nms_thresh": 0.4}))
    unregister_model("vit_menu_test")


def test_both_widgets_share_one_model_choice(make_napari_viewer, menu_test_type):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget
    from napari_sam._napari._session import session_for
    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer()
    viewer.add_image(data.coins()[:64, :64], name="coins")
    interactive, automatic = SamWidget(viewer), AutomaticSegmentationWidget(viewer)
    session = session_for(viewer)
    assert interactive.session is session and automatic.session is session
    assert interactive.engine is automatic.session.engine
    # Choosing in one widget changes the other's controls, the session's model and the thresholds.
    automatic._picker._model.value = "vit_menu_test"
    assert interactive._picker._model.value == "vit_menu_test" and session.spec.model_type == "vit_menu_test"
    assert automatic.settings().box_nms_thresh == pytest.approx(0.4)
    interactive._picker._model.value = "vit_small"
    assert automatic._picker._model.value == "vit_small"
    assert automatic.settings().pred_iou_thresh == pytest.approx(0.55)  # the small model's own threshold
    assert automatic.settings().box_nms_thresh == pytest.approx(0.3)
    interactive._picker._device.value = "cpu"
    assert session.spec.device == "cpu" and automatic._picker._device.value == "cpu"
    # A model given to napari_sam.segment becomes the viewer's model, for the widgets too.
    import napari_sam
    from napari_sam.models import create_model

    model = create_model("vit_test", device="cpu")
    points = viewer.add_points([[30, 30]])
    napari_sam.segment(viewer, points_layer=points, model=model, commit=False)
    assert interactive.engine.model is model and session.spec is None


def test_a_registered_model_type_is_in_both_menus(make_napari_viewer, menu_test_type):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget
    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer()
    for widget in (SamWidget(viewer), AutomaticSegmentationWidget(viewer)):
        choices = widget._picker._model.choices
        assert "vit_menu_test" in choices and "vit_test" not in choices


def test_automatic_widget_uses_the_sessions_loaded_model(make_napari_viewer, qtbot):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget
    from napari_sam._napari._session import session_for
    from napari_sam.models import create_model

    viewer = make_napari_viewer()
    viewer.add_image(data.coins()[:64, :80], name="coins")
    model = create_model("vit_test", device="cpu")
    session_for(viewer).use_model(model)
    widget = AutomaticSegmentationWidget(viewer)
    widget._settings["points_per_side"].value = 4
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        pass
    assert session_for(viewer).engine.model is model  # no second model was loaded
    assert viewer.layers["coins automatic"].data.shape == (64, 80)
    assert isinstance(viewer.layers["coins automatic"].data, np.ndarray)


def test_a_deleted_widget_stops_following_the_session(make_napari_viewer, menu_test_type, qtbot):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget
    from napari_sam._napari._session import session_for
    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer()
    session = session_for(viewer)
    automatic = AutomaticSegmentationWidget(viewer)
    following = len(session._listeners)
    interactive = SamWidget(viewer)
    assert len(session._listeners) > following
    with qtbot.waitSignal(interactive.native.destroyed, timeout=5_000):
        interactive.native.deleteLater()
    qtbot.wait(10)
    assert len(session._listeners) == following  # its picker and the widget itself let go
    automatic._picker._model.value = "vit_menu_test"  # would touch deleted Qt objects otherwise
    assert session.spec.model_type == "vit_menu_test"
