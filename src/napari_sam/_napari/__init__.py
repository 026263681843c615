"""napari adapters: the only modules that import napari, magicgui and qtpy.

Import guard: triton bundles its own LLVM, and importing it after an OpenGL context exists
crashes the process (segmentation fault) when the GL driver is LLVM-based (Mesa llvmpipe,
the software renderer of laptops without a GPU driver and of Xvfb; also radeonsi). Any
``import torchvision`` imports ``torch._dynamo``, which imports triton when it is installed
(the CUDA builds of torch ship it). napari-sam never uses triton (no ``torch.compile``), and
its napari code is loaded after the viewer's GL context exists, so unless triton is already
imported it is marked unavailable for this process. Set ``NAPARI_SAM_ALLOW_TRITON=1`` to skip
this (then import torch._dynamo before opening napari).
"""

import os
import sys

if os.environ.get("NAPARI_SAM_ALLOW_TRITON") != "1" and "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]
