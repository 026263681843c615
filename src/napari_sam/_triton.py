"""Keep triton from crashing a process that already shows a napari (Qt / OpenGL) window.

triton bundles its own LLVM, and loading it after Mesa's ``libLLVM`` is in the process crashes
the process (segmentation fault, in the dynamic loader, while ``import triton`` loads its
extension). Mesa loads ``libLLVM`` with the OpenGL driver (llvmpipe, the software renderer of
Xvfb and of machines without a GPU driver; radeonsi; recent Mesa for every driver), that is as
soon as a napari viewer is shown. ``import torchvision`` imports ``torch._dynamo``, which
imports triton when it is installed (the CUDA builds of torch ship it); napari-sam imports
torchvision in :mod:`napari_sam.utils.amg` (hence ``SamAutomaticMaskGenerator``).

napari-sam never uses triton (no ``torch.compile``). :func:`guard_triton` marks triton
unavailable for the process (``sys.modules["triton"] = None``, so ``import triton`` raises
ImportError, which torch handles) only when the crash is certain: triton installed but not
imported yet, and a ``libLLVM`` already mapped. It then logs a warning that says how to keep
triton: import torchvision before the window opens (as ``make run`` does), or set
``NAPARI_SAM_ALLOW_TRITON=1`` to skip the check.

Where the check runs: the package's ``__init__`` calls :func:`install`, which puts
:class:`_GuardFinder` first on ``sys.meta_path``. The import system asks it about every module
that is not imported yet; for a ``napari_sam`` submodule it runs :func:`guard_triton` and
then lets the normal finders load the module. So the check happens right before the body of
any napari-sam module runs, whenever that is: ``import napari_sam`` (torch-free) before
napari's window and ``import napari_sam.automatic_mask_generator`` after it is safe, as are the
lazy exports (``from napari_sam import SamAutomaticMaskGenerator``) and the plugin's widgets.
This module imports neither torch nor Qt.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from typing import Any, Optional, Sequence

_logger = logging.getLogger(__name__)

ALLOW_ENV = "NAPARI_SAM_ALLOW_TRITON"
PACKAGE = "napari_sam"


def _llvm_loaded() -> bool:
    """True when a shared ``libLLVM`` is mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


_INSTALLED: Optional[bool] = None


def _triton_installed() -> bool:
    """Whether triton can be imported (looked up once per process)."""
    global _INSTALLED
    if _INSTALLED is None:
        try:
            _INSTALLED = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _INSTALLED = False
    return _INSTALLED


def guard_triton() -> bool:
    """Mark triton unavailable when importing it now would crash the process.

    Returns:
        Whether it did (triton installed but not imported, and ``libLLVM`` already loaded,
        and ``NAPARI_SAM_ALLOW_TRITON`` is not ``1``).
    """
    if "triton" in sys.modules or os.environ.get(ALLOW_ENV) == "1":
        return False
    if not _triton_installed() or not _llvm_loaded():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    _logger.warning(
        "napari-sam: triton is installed but not imported, and Mesa's libLLVM is already loaded: "
        "importing triton now would crash napari, so it is marked unavailable in this process "
        "(napari-sam does not use it). To keep triton, import torchvision before napari opens its "
        "window (as `make run` does), or set %s=1 to skip this check.",
        ALLOW_ENV,
    )
    return True


class _GuardFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`guard_triton` before any ``napari_sam`` submodule is loaded; finds nothing itself."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> None:
        if fullname.startswith(PACKAGE + ".") and "triton" not in sys.modules:
            guard_triton()
        return None


def install() -> None:
    """Put the guard first on ``sys.meta_path`` (once per process).

    Nothing else happens yet: ``import napari_sam`` alone imports no torch and changes nothing;
    the guard runs when a submodule is first imported.
    """
    if not any(isinstance(finder, _GuardFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardFinder())
