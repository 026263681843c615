"""GUI test setup.

Import torch's compiler stack (which imports triton) before any viewer exists, as ``make run``
does: on this kind of machine (Mesa llvmpipe under Xvfb, triton 3.8) importing triton *after* an
OpenGL context was created crashes the process with a segmentation fault (see
``napari_sam._napari``), and the random-weight checkpoint helper imports it through
``segment_anything`` -> ``torchvision.ops`` -> ``torch._dynamo``. test_triton_guard.py checks
the other order, in a fresh interpreter.
"""

from __future__ import annotations

try:
    import torch._dynamo  # noqa: F401
except Exception:  # pragma: no cover - only an import-order guard
    pass
