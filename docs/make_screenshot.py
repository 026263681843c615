"""Make docs/images/widget.png: the Segment Anything widget in use (run under Xvfb).

    xvfb-run -a env PYTHONPATH=src python docs/make_screenshot.py

Uses the small offline model (vit_test, random weights), so the masks show the workflow, not
SAM's quality.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import load_rgb  # noqa: E402


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam._napari._widget import SamWidget

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 820)
    viewer.add_image(load_rgb("groceries.jpg"), name="groceries")
    widget = SamWidget(viewer)
    widget._model_combo.value = "vit_test"
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    app = QApplication.instance()

    def settle() -> None:
        for _ in range(2000):
            app.processEvents()
            if not widget.busy:
                break
            time.sleep(0.01)
        for _ in range(20):
            app.processEvents()
            time.sleep(0.01)

    widget.shapes_layer.add_rectangles(np.array([[60, 430], [330, 640]]))
    settle()
    widget.commit()
    settle()
    points = widget.points_layer
    points.add([330, 190])
    points.feature_defaults = {"label": "negative"}
    points.add([250, 120])
    points.feature_defaults = {"label": "positive"}
    widget.shapes_layer.add_rectangles(np.array([[200, 80], [480, 330]]))
    settle()
    viewer.layers.selection.active = points
    viewer.reset_view()
    settle()
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):  # startup warnings
        toast.close()
    settle()
    out = ROOT / "docs" / "images" / "widget.png"
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main()
