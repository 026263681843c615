"""GUI test setup.

Import torch's compiler stack (which imports triton) before any viewer exists: on this kind
of machine (Mesa llvmpipe under Xvfb, triton 3.9) importing triton *after* an OpenGL context
was created crashes the process with a segmentation fault, and the random-weight checkpoint
helper imports it through ``segment_anything`` -> ``torchvision.ops`` -> ``torch._dynamo``.
"""

from __future__ import annotations

try:
    import torch._dynamo  # noqa: F401
except Exception:  # pragma: no cover - only an import-order guard
    pass
