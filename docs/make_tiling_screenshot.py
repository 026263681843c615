"""Make docs/images/tiling.png: a large image segmented tile by tile (run under Xvfb).

    xvfb-run -a env PYTHONPATH=src python docs/make_tiling_screenshot.py

The image is synthetic, made here: a 1536 x 1536 16-bit "nuclei" field, about 400 textured
ellipses of 16-30 px on an uneven, noisy background. With the bundled small model
(vit_small, input 256 px) the "Tiling" setting's "auto" tiles it into 8 x 8 tiles of 256 px
(halo 32 px): one click on each of six nuclei in different tiles, each committed with **C**;
only those tiles are embedded, read from and written to an embeddings store in a temporary
folder. The tile cores are drawn as a Shapes layer (outlines), the embedded tiles' crops in
yellow, and the view is zoomed on the clicked region.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from _screenshots import save_screenshot, wait_until_idle  # docs/_screenshots.py (docs/ is on sys.path when run)



def make_field(size: int = 1536, count: int = 400, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A size x size uint16 field of ``count`` textured ellipses; returns it and their centres (row, col)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = 800 + 300 * gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 120) * 40
    image += 250 * np.sin(xx / 310.0) * np.cos(yy / 270.0)
    centres = []
    texture = gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 2) * 900
    for _ in range(count):
        r, c = rng.uniform(20, size - 20, size=2)
        a, b = rng.uniform(8, 15, size=2)
        angle = rng.uniform(0, np.pi)
        y0, y1, x0, x1 = int(r - 20), int(r + 21), int(c - 20), int(c + 21)
        dy, dx = yy[y0:y1, x0:x1] - r, xx[y0:y1, x0:x1] - c
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / a
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / b
        inside = u ** 2 + v ** 2 <= 1
        brightness = rng.uniform(2500, 5000)
        image[y0:y1, x0:x1][inside] = brightness + texture[y0:y1, x0:x1][inside]
        centres.append((int(r), int(c)))
    image = gaussian_filter(image, 1.0) + rng.normal(0, 120, size=(size, size))
    return np.clip(image, 0, 65535).astype(np.uint16), centres


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5 backend is deprecated.*")
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam._napari._widget import SamWidget
    from napari_sam.tiling import TileGrid

    field, centres = make_field()
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 900)
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)  # more room for the canvas
    viewer.add_image(field, name="nuclei field (synthetic, 16-bit, 1536 px)")
    widget = SamWidget(viewer)
    widget._picker._model.value = "vit_small"
    store = Path(tempfile.mkdtemp()) / "nuclei.zarr"
    widget.tiling.set(store=store)
    widget.native.setMaximumWidth(520)  # leave the canvas most of the window
    viewer.window.add_dock_widget(widget, name="Segment Anything")
    app = QApplication.instance()

    def settle() -> None:
        wait_until_idle(app, lambda: widget.busy)

    settle()
    grid = TileGrid(field.shape, (256, 256), (32, 32))
    # One nucleus in each of six tiles around the middle of the image.
    chosen, seen = [], set()
    for row, col in centres:
        tile = grid.tile_at(row, col)
        r, c = tile.position
        if 2 <= r <= 4 and 2 <= c <= 5 and tile.index not in seen and len(chosen) < 6:
            core = tile.core
            if core[0] + 25 < row < core[2] - 25 and core[1] + 25 < col < core[3] - 25:
                seen.add(tile.index)
                chosen.append((row, col))
    for row, col in chosen:
        widget.points_layer.add([row, col])
        settle()
        widget.commit()
        settle()
    print(widget._status.value)
    print("tiles embedded:", widget.engine.embeddings_computed, "of", len(grid))
    cores = [np.array([[t.core[0], t.core[1]], [t.core[2] - 1, t.core[3] - 1]]) for t in grid]
    viewer.add_shapes(cores, shape_type="rectangle", name="tile cores", edge_color="cyan", face_color="transparent",
                      edge_width=2, opacity=0.6)
    embedded = sorted({grid.tile_at(r, c).index for r, c in chosen})
    crops = [np.array([[grid[i].crop[0], grid[i].crop[1]], [grid[i].crop[2] - 1, grid[i].crop[3] - 1]])
             for i in embedded]
    viewer.add_shapes(crops, shape_type="rectangle", name="embedded tiles (crop with halo)", edge_color="yellow",
                      face_color="transparent", edge_width=3)
    widget.raise_prompt_layers()
    rows = [r for r, _ in chosen]
    cols = [c for _, c in chosen]
    viewer.camera.center = (0, (min(rows) + max(rows)) / 2, (min(cols) + max(cols)) / 2)
    viewer.camera.zoom = 1.0
    widget._status.value = (
        f"{len(chosen)} nuclei committed; {widget.engine.embeddings_computed} of {len(grid)} tiles embedded "
        f"(256 px, halo 32 px), written to the embeddings store."
    )
    save_screenshot(viewer, settle, "tiling.png")


if __name__ == "__main__":
    main()
