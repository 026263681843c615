"""Reading SAM checkpoint files and loading them with strict key and shape matching.

No checkpoint can run code while it is read. A file is first read with
``torch.load(weights_only=True)``. Training checkpoints (torch_em's, as micro-sam publishes
some of its models: ``{"model_state": {"sam.<key>": tensor, ...}, "optimizer_state": ...,
<training settings as objects of torch_em classes>}``) hold objects that ``weights_only``
refuses; those files are read a second time with :class:`RestrictedUnpickler`, which resolves
only torch's own tensor-rebuilding functions and plain containers (the list torch's
``weights_only`` loader trusts) and turns every other class or function the file names into an
inert placeholder (:class:`Placeholder`): nothing in the file is imported or called, and only
the tensors are kept.
"""

from __future__ import annotations

import os
import pickle
import types
from typing import TYPE_CHECKING, Any, Mapping, Union

if TYPE_CHECKING:
    import torch
    from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

#: How the SAM tensors are stored in a checkpoint file (:func:`checkpoint_layout`):
#: "state_dict": a SAM state dict, bare or under "model" / "state_dict" (the official files,
#: napari-sam's own, micro-sam's exported files); "torch_em": a training checkpoint with the
#: state dict under "model_state", its keys prefixed "sam.", beside non-tensor training state.
LAYOUTS = ("state_dict", "torch_em")
#: Keys under which checkpoints hold the state dict, in the order they are looked for.
STATE_KEYS = ("model_state", "model", "state_dict")
#: Key prefixes removed when every key has them (DataParallel's, then torch_em's SAM wrapper's).
STRIPPED_PREFIXES = ("module.", "sam.")
#: Entries of a state dict that are not SAM tensors and are dropped (micro-sam's instance
#: segmentation decoder, saved beside the SAM weights; out of scope here).
IGNORED_ENTRIES = ("decoder_state",)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the requested model."""


class Placeholder:
    """Stands for a class or function a checkpoint names that is not a tensor or plain container.

    The restricted unpickler returns a subclass of this (named after the original, for
    messages) instead of importing anything. Creating, calling or filling one does nothing
    but store the arguments: calling an instance (a pickle that calls what it got from
    ``getattr(<class>, "<method>")``, say) gives another inert instance.
    """

    __slots__ = ("args", "state")
    original = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        instance = object.__new__(cls)
        object.__setattr__(instance, "args", args)
        object.__setattr__(instance, "state", None)
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "Placeholder":
        return type(self)(*args)

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: Any) -> None:
        pass  # pickle's BUILD without __setstate__, or setattr from state: ignored

    def __repr__(self) -> str:
        return f"<placeholder for {self.original}>"


def _allowed_globals() -> dict[str, Any]:
    """Torch's own list of what a ``weights_only`` load may resolve (tensor and storage
    types, dtypes, the tensor rebuild functions, OrderedDict, ...), without any globals
    a user added with ``torch.serialization.add_safe_globals``."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


_PLACEHOLDERS: dict[str, type] = {}


def _placeholder(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(f"Placeholder[{key}]", (Placeholder,), {"__slots__": (), "original": key})
    return _PLACEHOLDERS[key]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only what torch's ``weights_only`` loader allows; every
    other global becomes an inert :class:`Placeholder` class (nothing is imported or run).

    Used through :data:`restricted_pickle` as ``torch.load(..., pickle_module=restricted_pickle,
    weights_only=False)``; torch's own unpickler subclasses this one, so its storage handling
    (``persistent_load``) still rebuilds the tensors.
    """

    _allowed: "dict[str, Any] | None" = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        found = RestrictedUnpickler._allowed.get(f"{module}.{name}")
        return found if found is not None else _placeholder(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: A stand-in for the ``pickle`` module whose ``Unpickler`` is :class:`RestrictedUnpickler`
#: (torch.load's ``pickle_module`` argument).
restricted_pickle = types.ModuleType("napari_sam_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def load_checkpoint_file(path: PathLike) -> Any:
    """The object a checkpoint file holds, on the CPU, read without running any of its code.

    ``weights_only=True`` first; when it refuses the file's non-tensor objects, the file is
    read again with :class:`RestrictedUnpickler` (those objects become :class:`Placeholder`
    instances; tensors, dicts, lists and numbers are kept).

    Raises:
        CheckpointError: not a PyTorch checkpoint (or corrupt).
    """
    import torch

    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as refused:  # objects weights_only does not allow
        first = refused
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(
            f"Could not read {path!r} as a PyTorch checkpoint (torch.load with weights_only=True): {error}"
        ) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except Exception as error:
        raise CheckpointError(
            f"Could not read {path!r} as a PyTorch checkpoint: torch.load with weights_only=True refused it "
            f"({str(first).splitlines()[0]}) and the restricted reader (tensors only, no code run) failed: {error}"
        ) from error


def checkpoint_layout(loaded: Any) -> str:
    """Which of :data:`LAYOUTS` a loaded checkpoint has ("torch_em" when it holds "model_state")."""
    return "torch_em" if isinstance(loaded, Mapping) and isinstance(loaded.get("model_state"), Mapping) else "state_dict"


def _strip_prefixes(state: "dict[str, Any]") -> "dict[str, Any]":
    for prefix in STRIPPED_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def state_dict_from(loaded: Any, what: str = "the checkpoint") -> "dict[str, torch.Tensor]":
    """The SAM state dict in a loaded checkpoint (see :func:`read_state_dict` for the layouts).

    Raises:
        CheckpointError: no mapping of names to tensors in a known place.
    """
    import torch

    state = loaded
    if isinstance(loaded, Mapping):
        for key in STATE_KEYS:
            if key in loaded and isinstance(loaded[key], Mapping):
                state = loaded[key]
                break
    if isinstance(state, Mapping):
        state = {k: v for k, v in state.items() if not (k in IGNORED_ENTRIES and isinstance(v, Mapping))}
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        others = (
            [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)][:3]
            if isinstance(state, Mapping) else []
        )
        raise CheckpointError(
            f"{what} does not hold a state dict (a mapping of SAM tensor names to tensors, bare or under "
            f"{' / '.join(repr(k) for k in STATE_KEYS)}); found {type(loaded).__name__}"
            + (f" with non-tensor entries {', '.join(others)}" if others else "") + "."
        )
    return _strip_prefixes(dict(state))


def read_state_dict(checkpoint: PathLike) -> "dict[str, torch.Tensor]":
    """Read a SAM state dict from a file, on the CPU, without running any code the file holds.

    Accepts a bare state dict, one stored under a ``"model"`` or ``"state_dict"`` key (common
    for fine-tuned checkpoints), and torch_em training checkpoints (micro-sam's: under
    ``"model_state"``, beside non-tensor training state, which is read as inert placeholders
    and dropped; a ``"decoder_state"`` is ignored). A ``"module."`` prefix (DataParallel) and
    a ``"sam."`` prefix (torch_em's SAM wrapper) are removed when every key has it.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a PyTorch checkpoint holding a SAM state dict.
    """
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path!r} (expected a .pth file).")
    return state_dict_from(load_checkpoint_file(path), repr(path))


def load_strict(model: "nn.Module", state_dict: Mapping[str, Any], what: str) -> None:
    """Load ``state_dict`` into ``model`` with strict key and shape matching.

    Args:
        model: the module to fill.
        state_dict: names to tensors.
        what: the model's name for the error message (e.g. ``"vit_b SAM"``).

    Raises:
        CheckpointError: missing, unexpected or mis-shaped tensors (up to five of each named).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        def preview(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys ({preview(missing)})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys ({preview(unexpected)})")
        if wrong:
            problems.append(f"wrong shapes for {preview(wrong)}")
        raise CheckpointError(f"Checkpoint does not fit a {what}: " + "; ".join(problems) + ".")
    model.load_state_dict(state_dict, strict=True)
