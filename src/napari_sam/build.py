"""The reference's model-building names: ``sam_model_registry`` and ``build_sam_vit_*``.

``sam_model_registry[name](checkpoint=path)`` works as in the reference for ``default``
(= ``vit_h``), ``vit_h``, ``vit_l`` and ``vit_b``, and for every other type of the model
registry (:mod:`napari_sam.models`), which it reads live: a type registered later is here too.
Checkpoints load on the CPU with ``weights_only=True``; a checkpoint made for another type
raises an error that names the type it fits, detected from the tensor shapes.
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Union

from .models import registry
from .models.registry import detect_model_type, load_weights
from .models.sam_vit import IMAGE_SIZE, PATCH_SIZE, PROMPT_EMBED_DIM, SamConfig
from .models.state_dict import CheckpointError, read_state_dict

if TYPE_CHECKING:
    from .modeling import Sam

PathLike = Union[str, "os.PathLike[str]"]

EncoderConfig = SamConfig  # an older name


def build_sam_from_config(config: SamConfig) -> "Sam":
    """Build an untrained SAM (in eval mode) with the given sizes (``config.build()``)."""
    return config.build()


def build_sam_type(model_type: str, checkpoint: Optional[PathLike] = None) -> "Sam":
    """Build a SAM of a registry type on the CPU, loading ``checkpoint`` (a path) when given.
    See :func:`napari_sam.models.build_model`."""
    return registry.build_model(model_type, checkpoint)


def load_state_dict_strict(model: "Sam", state_dict: Mapping[str, Any], model_type: str) -> None:
    """Load ``state_dict`` into a model of ``model_type`` strictly (see :func:`napari_sam.models.load_weights`)."""
    load_weights(model, state_dict, model_type)


class _RegistryView(Mapping[str, Any]):
    """A read-only mapping over the model registry, evaluated on every access."""

    def __init__(self, value: Callable[[str], Any], aliases: bool) -> None:
        self._value = value
        self._aliases = aliases

    def _names(self) -> list[str]:
        names = registry.model_types()
        return [a for a in registry.model_types(aliases=True) if a not in names] + names if self._aliases else names

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(f"Unknown SAM model type {name!r}; expected one of {', '.join(self._names())}.")
        return self._value(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"{{{', '.join(repr(n) for n in self._names())}}}"


_BUILDERS: dict[str, Callable[..., "Sam"]] = {}


def _builder(name: str) -> Callable[..., "Sam"]:
    """One builder function per type, so that an alias gives the same object (as in the reference)."""
    canonical = registry.canonical_type(name)
    if canonical not in _BUILDERS:
        _BUILDERS[canonical] = partial(build_sam_type, canonical)
    return _BUILDERS[canonical]


#: Model type -> architecture config, for every registered type with a :class:`SamConfig`.
MODEL_CONFIGS: Mapping[str, SamConfig] = _RegistryView(registry.architecture, aliases=False)
#: The reference's registry: ``sam_model_registry[type](checkpoint=None)`` builds a model.
sam_model_registry: Mapping[str, Callable[..., "Sam"]] = _RegistryView(_builder, aliases=True)


def build_sam_vit_h(checkpoint: Optional[PathLike] = None) -> "Sam":
    """SAM with the ViT-H image encoder (official ``sam_vit_h_4b8939.pth``)."""
    return build_sam_type("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: Optional[PathLike] = None) -> "Sam":
    """SAM with the ViT-L image encoder (official ``sam_vit_l_0b3195.pth``)."""
    return build_sam_type("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: Optional[PathLike] = None) -> "Sam":
    """SAM with the ViT-B image encoder (official ``sam_vit_b_01ec64.pth``)."""
    return build_sam_type("vit_b", checkpoint)


def __getattr__(name: str) -> Callable[..., "Sam"]:
    """``build_sam_<type>`` for every other registry type (``build_sam_vit_small``, ...), as the
    reference's ``build_sam_vit_*`` (PEP 562): random weights without ``checkpoint``."""
    model_type = name[len("build_sam_"):] if name.startswith("build_sam_") else None
    if model_type is not None and model_type in registry.model_types():
        return _builder(model_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BUILDERS.update(vit_h=build_sam_vit_h, vit_l=build_sam_vit_l, vit_b=build_sam_vit_b)

__all__ = [
    "CheckpointError",
    "IMAGE_SIZE",
    "MODEL_CONFIGS",
    "PATCH_SIZE",
    "PROMPT_EMBED_DIM",
    "SamConfig",
    "build_sam_from_config",
    "build_sam_type",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "detect_model_type",
    "load_state_dict_strict",
    "read_state_dict",
    "sam_model_registry",
]
