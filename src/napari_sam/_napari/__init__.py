"""napari adapters: the only modules that import napari, magicgui and qtpy.

triton and Mesa's OpenGL driver: triton bundles its own LLVM, and loading it after Mesa's
``libLLVM`` is in the process crashes the process (segmentation fault, in the dynamic loader,
while ``import triton`` loads its extension). Mesa loads ``libLLVM`` with the OpenGL driver
(llvmpipe, the software renderer of Xvfb and of machines without a GPU driver; radeonsi;
recent Mesa for every driver). ``import torchvision`` imports ``torch._dynamo``, which imports
triton when it is installed (the CUDA builds of torch ship it), and napari loads this package
after its window, hence the GL context, exists.

The cure is to import triton first: ``make run`` and the test suite import ``torchvision``
before napari opens a window. When napari was started some other way (``napari``, a script),
:func:`guard_triton` runs where napari-sam starts its model work in a viewer (when the viewer's
session is created, before anything imports torchvision), not when this package is imported:
only if the crash is certain (triton installed but not imported, ``libLLVM`` already loaded)
it marks triton unavailable for this process and logs a warning that says how to avoid it.
napari-sam never uses triton (no ``torch.compile``). Set ``NAPARI_SAM_ALLOW_TRITON=1`` to
skip the guard (then import torchvision before napari opens its window).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

_logger = logging.getLogger(__name__)


def _llvm_loaded() -> bool:
    """True when a shared ``libLLVM`` is mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def guard_triton() -> bool:
    """Mark triton unavailable when importing it now would crash; return whether it did."""
    if os.environ.get("NAPARI_SAM_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return False
    if importlib.util.find_spec("triton") is None or not _llvm_loaded():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    _logger.warning(
        "napari-sam: triton is installed but not imported, and Mesa's libLLVM is already loaded: "
        "importing triton now would crash napari, so it is marked unavailable in this process "
        "(napari-sam does not use it). To keep triton, import torchvision before napari opens its "
        "window (as `make run` does), or set NAPARI_SAM_ALLOW_TRITON=1 to skip this check."
    )
    return True
