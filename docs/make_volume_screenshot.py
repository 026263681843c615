"""Make docs/images/volume.png: an object segmented through a 3-D stack (run under Xvfb).

    xvfb-run -a env PYTHONPATH=src python docs/make_volume_screenshot.py

The stack is synthetic, made here (``benchmarks/bench_volume.py``'s ``make_volume``): a
24 x 128 x 128 16-bit "nuclei" volume, four textured ellipsoids that drift, turn and change
shape between slices (two touching, one ending and one starting mid-stack) on an uneven,
noisy background, shown with a z scale of 2. With the bundled small model (vit_small), one
click on the middle slice of each of two nuclei (the two that touch no other), then "Segment object in volume" [V] for each;
the picture shows the 3-D view of the committed objects over the image.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from _screenshots import save_screenshot, wait_until_idle  # docs/_screenshots.py (docs/ is on sys.path when run)

ROOT = Path(__file__).resolve().parents[1]


def make_volume():
    spec = importlib.util.spec_from_file_location("bench_volume", ROOT / "benchmarks" / "bench_volume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.make_volume()


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_sam._napari._widget import SamWidget

    volume, truth = make_volume()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 820)
    image = viewer.add_image(volume, name="nuclei (synthetic, 16-bit)", scale=(2.0, 1.0, 1.0))
    widget = SamWidget(viewer)
    widget._picker._model.value = "vit_small"
    widget.native.setMaximumWidth(520)  # leave the canvas most of the window
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    app = QApplication.instance()

    def settle() -> None:
        wait_until_idle(app, lambda: widget.busy or widget.volume_worker is not None)

    from scipy.ndimage import distance_transform_edt

    for label in (3, 4):
        present = np.flatnonzero((truth == label).any(axis=(1, 2)))
        z = int((present[0] + present[-1]) // 2)
        distance = distance_transform_edt(truth[z] == label)
        row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
        viewer.dims.set_current_step(0, z)
        settle()
        widget.points_layer.add([z, row, col])
        settle()
        widget.segment_in_volume()
        settle()
    print(widget._status.value)
    output = widget.output_layer
    print("objects:", np.unique(output.data[output.data > 0]), "slices:", (output.data > 0).any(axis=(1, 2)).sum())
    viewer.dims.ndisplay = 3
    image.rendering = "mip"
    image.opacity = 0.6
    viewer.reset_view()
    viewer.camera.angles = (-25, 35, 75)
    viewer.camera.zoom *= 1.3
    save_screenshot(viewer, settle, "volume.png")


if __name__ == "__main__":
    main()
