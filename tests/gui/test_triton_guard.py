"""napari started without importing triton first: opening napari-sam must not crash the process,
and importing the plugin changes nothing in ``sys.modules``.

triton loaded after Mesa's libLLVM segfaults (see ``napari_sam._napari``). The test suite imports
triton before any viewer (tests/gui/conftest.py), so this runs in a fresh interpreter that opens a
viewer first, as ``napari`` from a shell does, then imports the plugin and torchvision.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import napari

    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((64, 64), dtype=np.uint8))
    from qtpy.QtWidgets import QApplication

    QApplication.processEvents()
    assert "triton" not in sys.modules, "the viewer imported triton itself"
    from napari_sam._napari import _llvm_loaded

    if not _llvm_loaded():
        print("NO_LLVM")
        sys.exit(0)
    assert sys.modules.get("triton", "absent") == "absent", "importing the plugin changed sys.modules"
    from napari_sam._napari._widget import SamWidget

    SamWidget(viewer)  # opening the widget creates the viewer's session, which applies the guard
    import torchvision.ops  # torch._dynamo -> triton: crashes here without the guard

    viewer.add_image(np.ones((64, 64), dtype=np.uint8))
    QApplication.processEvents()
    viewer.close()
    print("SURVIVED")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_plugin_import_after_gl_context_does_not_crash():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NAPARI_SAM_ALLOW_TRITON", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if "NO_LLVM" in result.stdout:
        pytest.skip("this OpenGL driver does not load libLLVM, so there is no crash to guard against")
    assert result.returncode == 0, output[-3000:]
    assert "SURVIVED" in result.stdout
    assert "importing triton now would crash napari" in output
