"""napari adapters: the only modules that import napari, magicgui and qtpy.

napari loads this package after its window (hence an OpenGL context) exists; the guard that
keeps torchvision's import of triton from crashing such a process runs before any napari-sam
module is loaded, see :mod:`napari_sam._triton` (re-exported here: :func:`guard_triton`).
"""

from __future__ import annotations

from .._triton import _llvm_loaded, guard_triton

__all__ = ["guard_triton", "_llvm_loaded"]
