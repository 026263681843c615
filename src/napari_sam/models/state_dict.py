"""Reading SAM checkpoint files and loading them with strict key and shape matching."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Union

if TYPE_CHECKING:
    import torch
    from torch import nn

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the requested model."""


def read_state_dict(checkpoint: PathLike) -> "dict[str, torch.Tensor]":
    """Read a SAM state dict from a file, on the CPU, with ``weights_only=True``.

    Accepts a bare state dict or one stored under a ``"model"`` or ``"state_dict"`` key
    (common for fine-tuned checkpoints); a ``"module."`` prefix (DataParallel) is removed.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a PyTorch checkpoint holding a SAM state dict.
    """
    import torch

    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path!r} (expected a .pth file).")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(
            f"Could not read {path!r} as a PyTorch checkpoint (torch.load with weights_only=True): {error}"
        ) from error
    state = loaded
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            if key in loaded and isinstance(loaded[key], Mapping):
                state = loaded[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path!r} does not hold a state dict (a mapping of names to tensors, bare or under "
            f"'model' / 'state_dict'); found {type(loaded).__name__}."
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


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
