"""The npe2 manifest validates, imports its commands, and opens the widget in napari."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "napari.yaml"


def _env() -> dict[str, str]:
    # This checkout's package first (the venv's editable install may point elsewhere).
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.parametrize("target", ["napari-sam", str(MANIFEST)])
def test_npe2_validate_with_imports(target):
    npe2 = Path(sys.executable).with_name("npe2")
    command = [str(npe2)] if npe2.exists() else [sys.executable, "-m", "npe2"]
    result = subprocess.run(
        [*command, "validate", target, "--imports"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_package_manifest_is_the_root_manifest():
    packaged = ROOT / "src" / "napari_sam" / "napari.yaml"
    assert packaged.is_symlink() and packaged.resolve() == MANIFEST.resolve()


@pytest.mark.gui
def test_widget_opens_from_plugin_menu(make_napari_viewer, npe2pm, qtbot):
    from napari_sam._napari._widget import SamWidget

    with npe2pm.tmp_plugin(manifest=str(MANIFEST)):
        viewer = make_napari_viewer()
        viewer.add_image(__import__("skimage.data", fromlist=["coins"]).coins())
        dock, widget = viewer.window.add_plugin_dock_widget("napari-sam", "Segment Anything")
        assert isinstance(widget, SamWidget)
        assert widget.image_layer is viewer.layers[0]
        widget._timer.stop()  # no model download in tests
