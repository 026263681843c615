"""What the user sees (project issue 29): a status area that shows a whole message, in both
widgets, and prompt points and boxes drawn above every Labels layer."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

pytestmark = pytest.mark.gui

LONG_ERROR = (
    "Error: The model weights could not be downloaded. Could not download sam_vit_b_01ec64.pth from "
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth: HTTPSConnectionPool(host="
    "'dl.fbaipublicfiles.com', port=443): Max retries exceeded with url: /segment_anything/sam_vit_b_01ec64.pth "
    "(Caused by NameResolutionError: Failed to resolve 'dl.fbaipublicfiles.com')\nWithout network access, "
    "download sam_vit_b_01ec64.pth elsewhere and copy it into /home/someone/.cache/napari-sam/a/very/long/"
    "folder/name/without/any/spaces/in/it/at/all (exact folder). END-OF-MESSAGE"
)


def open_widget(make_napari_viewer, which):
    from napari_sam._napari._automatic_widget import AutomaticSegmentationWidget
    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer(show=True)
    viewer.add_image(data.coins()[:64, :64], name="coins")
    widget = (SamWidget if which == "interactive" else AutomaticSegmentationWidget)(viewer)
    viewer.window.add_dock_widget(widget, name=which)
    return viewer, widget


@pytest.mark.parametrize("which", ["interactive", "automatic"])
def test_status_area_shows_a_whole_long_message(make_napari_viewer, qtbot, which):
    viewer, widget = open_widget(make_napari_viewer, which)
    status = widget._status
    qtbot.waitUntil(lambda: status.native.isVisible(), timeout=10_000)
    if which == "interactive":  # it embeds the image as soon as it opens: let that finish first
        for _ in range(2):  # idle, and still idle after a pause (a request may be scheduled late)
            qtbot.waitUntil(lambda: widget.worker is None and not widget._timer.isActive(), timeout=120_000)
            qtbot.wait(500)
    status.value = "Short."
    qtbot.wait(20)
    short_height = status.native.height()

    status.show_error(LONG_ERROR)
    qtbot.wait(20)
    box = status.native
    assert status.value == LONG_ERROR and status.is_error  # nothing cut off
    assert status.tooltip == LONG_ERROR  # the whole message on hover too
    # Across the widget's full width, not in the narrow column right of the control labels.
    assert box.width() >= 0.9 * widget.native.width(), (box.width(), widget.native.width())
    # It grew with the text, which wraps (no horizontal scrolling) and can be selected and copied.
    assert box.height() > short_height
    assert box.horizontalScrollBar().maximum() == 0
    assert box.isReadOnly()
    from qtpy.QtCore import Qt

    assert box.textInteractionFlags() & Qt.TextInteractionFlag.TextSelectableByMouse
    box.selectAll()
    assert box.textCursor().selectedText().replace("\u2029", "\n") == LONG_ERROR
    # Up to a bound, then it scrolls: every line stays reachable.
    status.value = "\n".join(f"line {i}" for i in range(100))
    qtbot.wait(20)
    assert box.height() < 400 and box.verticalScrollBar().maximum() > 0
    assert not status.is_error


def prompt_layers_on_top(viewer) -> bool:
    from napari.layers import Labels, Points, Shapes

    layers = list(viewer.layers)
    labels = [i for i, layer in enumerate(layers) if isinstance(layer, Labels)]
    prompts = [i for i, layer in enumerate(layers) if isinstance(layer, (Points, Shapes))]
    return bool(prompts) and (not labels or min(prompts) > max(labels))


def test_prompt_layers_stay_above_labels_layers(make_napari_viewer, qtbot):
    from napari_sam._napari._widget import SamWidget

    viewer = make_napari_viewer()
    viewer.add_image(data.coins()[:64, :64], name="coins")
    widget = SamWidget(viewer)
    # The layers the widget makes: output and current-object labels below the points and boxes.
    assert widget.points_layer is not None and widget.output_layer is not None
    qtbot.waitUntil(lambda: prompt_layers_on_top(viewer), timeout=5_000)
    assert viewer.layers[-2:] == [widget.points_layer, widget.shapes_layer]

    # A Labels layer added later (by the user, the automatic widget, a script) goes on top; the
    # prompt layers follow it up, in their order, and stay the widget's prompt layers.
    viewer.add_labels(np.zeros((64, 64), dtype=np.uint32), name="user labels")
    qtbot.waitUntil(lambda: prompt_layers_on_top(viewer), timeout=5_000)
    assert viewer.layers[-2:] == [widget.points_layer, widget.shapes_layer]
    assert viewer.layers[-3].name == "user labels"

    # The widget's current-object layer, deleted then made again, also goes below them.
    viewer.layers.remove(widget.current_layer)
    widget._current.show(viewer.layers["coins"], _slice(viewer), [np.ones((64, 64), bool)])
    qtbot.waitUntil(lambda: prompt_layers_on_top(viewer), timeout=5_000)


def _slice(viewer):
    from napari_sam._napari._layers import current_slice

    return current_slice(viewer, viewer.layers["coins"])


def test_raise_prompt_layers_without_the_widget(make_napari_viewer):
    """napari_sam.segment and the automatic widget use the same helper directly."""
    from napari_sam._napari import _layers

    viewer = make_napari_viewer()
    image = viewer.add_image(data.coins()[:64, :64], name="coins")
    own_points = viewer.add_points([[10, 10]], name="my points")
    boxes = _layers.make_boxes_layer(viewer, image)
    viewer.add_labels(np.zeros((64, 64), dtype=np.uint32), name="masks")
    other = viewer.add_points([[5, 5]], name="not a prompt layer")
    assert _layers.raise_prompt_layers(viewer, [own_points, None])
    assert [layer.name for layer in viewer.layers] == [
        "coins", "masks", "not a prompt layer", "my points", boxes.name,
    ]
    assert other in viewer.layers
    assert not _layers.raise_prompt_layers(viewer, [own_points])  # already on top: nothing moves
