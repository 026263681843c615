"""Make docs/images/widget.png: the Segment Anything widget in use (run under Xvfb).

    xvfb-run -a env PYTHONPATH=src python docs/make_screenshot.py

Uses the bundled small model (vit_small) on scikit-image's coins photograph: four coins
committed from one click each, one from a box, and a current object from a positive and a
negative point.
"""

from __future__ import annotations


import numpy as np

from _screenshots import save_screenshot, wait_until_idle  # docs/_screenshots.py (docs/ is on sys.path when run)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam._napari._widget import SamWidget

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 820)
    from skimage import data

    viewer.add_image(data.coins(), name="coins")
    widget = SamWidget(viewer)
    widget._picker._model.value = "vit_small"
    widget.native.setMaximumWidth(520)  # leave the canvas most of the window
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    app = QApplication.instance()

    def settle() -> None:
        wait_until_idle(app, lambda: widget.busy, start=0, limit=2000)

    points = widget.points_layer
    for row, col in [(50, 45), (55, 100), (52, 155), (125, 45)]:  # one click per coin, committed
        points.add([row, col])
        settle()
        widget.commit()
        settle()
        widget.clear_prompts()
        settle()
    widget.shapes_layer.add_rectangles(np.array([[100, 75], [155, 125]]))
    settle()
    widget.commit()
    settle()
    widget.clear_prompts()
    settle()
    points.add([190, 205])
    points.feature_defaults = {"label": "negative"}
    points.add([240, 300])
    points.feature_defaults = {"label": "positive"}
    settle()
    viewer.layers.selection.active = points
    viewer.reset_view()
    save_screenshot(viewer, settle, "widget.png")


if __name__ == "__main__":
    main()
