"""napari shown first, napari-sam imported after: no import may crash the process.

triton loaded after Mesa's libLLVM segfaults (see ``napari_sam._triton``); torchvision imports
triton. The test suite imports triton before any viewer (tests/gui/conftest.py), so each case
runs in a fresh interpreter that shows a viewer first, as ``napari`` from a shell does (and
napari's console), then imports napari-sam in the way the case names, then torchvision.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys

{before}

import numpy as np
import napari
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=True)
viewer.add_image(np.zeros((64, 64), dtype=np.uint8))
QApplication.processEvents()
assert "triton" not in sys.modules, "the viewer imported triton itself"
with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
    if not any("libLLVM" in line for line in maps):
        print("NO_LLVM")
        sys.exit(0)

{after}

import torchvision.ops  # torch._dynamo -> triton: crashes here too without the guard

viewer.add_image(np.ones((64, 64), dtype=np.uint8))
QApplication.processEvents()
viewer.close()
print("SURVIVED")
"""

EVERY_PUBLIC_MODULE = """
import importlib
import pkgutil

import napari_sam

names = [m.name for m in pkgutil.walk_packages(napari_sam.__path__, "napari_sam.", onerror=lambda name: None)
         if not any(part.startswith("_") for part in m.name.split("."))]
assert "napari_sam.automatic_mask_generator" in names and "napari_sam.predictor" in names, names
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:  # another bug (e.g. a module being edited), not the crash tested here
        print(f"IMPORT ERROR {name}: {error!r}")
print("IMPORTED", len(names))
"""

CASES = {
    # The tester's report: napari's console, after the viewer is shown.
    "lazy export": ("", "from napari_sam import SamAutomaticMaskGenerator"),
    # The package (and torch, through the predictor) imported before the window, the AMG after.
    "package before the viewer": ("import napari_sam, napari_sam.predictor", "import napari_sam.automatic_mask_generator"),
    "every public module": ("", EVERY_PUBLIC_MODULE),
    # napari opens the plugin's widget, whose model work imports the AMG on a worker thread later.
    "widget": ("", "from napari_sam._napari._widget import SamWidget\nSamWidget(viewer)\n"
                   "from napari_sam import SamAutomaticMaskGenerator"),
}


def run_case(before: str, after: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NAPARI_SAM_ALLOW_TRITON", None)
    script = SCRIPT.format(before=before, after=textwrap.dedent(after))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_importing_napari_sam_after_a_viewer_is_shown_does_not_crash(case):
    result = run_case(*CASES[case])
    output = result.stdout + result.stderr
    if "NO_LLVM" in result.stdout:
        pytest.skip("this OpenGL driver does not load libLLVM, so there is no crash to guard against")
    assert result.returncode == 0, f"rc {result.returncode}\n{output[-3000:]}"
    assert "SURVIVED" in result.stdout
    assert "importing triton now would crash napari" in output  # the warning says what happened and why


def test_import_napari_sam_alone_changes_nothing():
    """``import napari_sam`` after the viewer: no torch, triton untouched (the guard waits for a submodule)."""
    result = run_case("", "import napari_sam\nassert 'torch' not in sys.modules\n"
                          "assert sys.modules.get('triton', 'absent') == 'absent'\nimport napari_sam.predictor\n"
                          "assert sys.modules['triton'] is None")
    if "NO_LLVM" in result.stdout:
        pytest.skip("this OpenGL driver does not load libLLVM")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_allow_triton_skips_the_guard(monkeypatch):
    from napari_sam import _triton

    monkeypatch.setenv("NAPARI_SAM_ALLOW_TRITON", "1")
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(_triton, "_llvm_loaded", lambda: True)
    assert not _triton.guard_triton() and "triton" not in sys.modules
    monkeypatch.delenv("NAPARI_SAM_ALLOW_TRITON")
    monkeypatch.setattr(_triton, "_INSTALLED", True)
    assert _triton.guard_triton() and sys.modules["triton"] is None
