"""The reference's ``segment_anything.build_sam`` module, by that name.

``from napari_sam.build_sam import sam_model_registry, build_sam_vit_b, build_sam`` works as
``from segment_anything.build_sam import ...`` does. The builders live in
:mod:`napari_sam.build` (registry types) and :mod:`napari_sam.checkpoints` (``build_sam``);
this module only re-exports them under the reference's module path.

Why the module is callable: the package exports a *function* ``napari_sam.build_sam``
(lazily, from :mod:`napari_sam.checkpoints`), as the reference exports its function
``segment_anything.build_sam``. Importing this submodule makes Python set the package
attribute ``napari_sam.build_sam`` to the *module* (the import system binds every submodule
on its parent after loading it), so, depending on import order, ``napari_sam.build_sam`` is
the function or this module. Instead of fighting the import system (re-binding the attribute
after every import is order dependent and fragile), the module's class is swapped for a
:class:`types.ModuleType` subclass whose ``__call__`` forwards to the function, and which
carries the function's signature: ``napari_sam.build_sam(checkpoint=...)`` then behaves the
same in either order, and the module keeps every ordinary module behaviour (``sys.modules``,
``importlib.reload``, attribute access, pickling of the functions it holds).

Differences from the reference (deliberate): ``build_sam`` is napari-sam's
:func:`napari_sam.checkpoints.build_sam` (``model_type``, ``checkpoint``, ``device``, ...;
``build_sam(path)`` and ``build_sam(checkpoint=path)`` work as in the reference, while
``build_sam()`` loads known weights instead of building an untrained ViT-H), and
``sam_model_registry`` is a read-only live view of the model registry rather than a dict.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Callable

from .build import __getattr__ as _registry_builder
from .build import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
from .checkpoints import build_sam
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "sam_model_registry",
]


def __getattr__(name: str) -> Callable[..., Sam]:
    """``build_sam_<type>`` for the registry's other types (``build_sam_vit_small``, ...), as in
    :mod:`napari_sam.build` (PEP 562)."""
    try:
        return _registry_builder(name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`napari_sam.checkpoints.build_sam` (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Sam:
        return build_sam(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
# inspect.signature(napari_sam.build_sam) shows build_sam's parameters whichever object it is.
__signature__ = inspect.signature(build_sam)
