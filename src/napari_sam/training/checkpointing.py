"""The files of a training run folder: resumable training state, loss history, final weights.

``training_state.pt`` holds the model and optimizer state dicts (tensors) and, as one JSON
string beside them, the number of steps done, the logged history and the run's
:class:`~napari_sam.training.config.TrainConfig`; ``history.jsonl`` one JSON line of losses per
logged step; ``model.pth`` a plain SAM state dict. Every write is atomic: a temporary file,
then a rename. Every read uses ``torch.load(weights_only=True)``: a run folder from elsewhere
can hold no code that runs on resume (a file with pickled objects is refused).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_write
from .config import TrainConfig

STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.jsonl"
MODEL_FILE = "model.pth"
PROGRESS_KEY = "progress_json"  # steps done, history and settings: a JSON string in the state file


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temp:
        torch.save(obj, temp)


@dataclass
class TrainState:
    """Where a run stands: steps done and the history records logged so far."""

    step: int = 0
    history: list = field(default_factory=list)


def save_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, config: TrainConfig,
) -> None:
    """Write the resumable training state (atomic)."""
    progress = {"step": state.step, "history": state.history, "config": asdict(config)}
    save_atomic(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
         PROGRESS_KEY: json.dumps(progress, default=_json_value)},
        path,
    )


def _json_value(value: Any) -> Any:
    """JSON form of config values that JSON lacks (paths, tuples are lists already)."""
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot store {type(value).__name__} {value!r} in the training state.")


def _read_state(path: Path, map_location: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the state dicts, the progress: step, history, config) of a training state file.

    Raises:
        ValueError: see :func:`load_training_state`.
    """
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a napari-sam training state that can be loaded safely (it holds pickled objects, "
            f"which are never run): {error}"
        ) from error
    if not isinstance(saved, dict) or "model" not in saved or "optimizer" not in saved:
        raise ValueError(f"{path} is not a napari-sam training state (expected model and optimizer state dicts).")
    # PROGRESS_KEY: JSON since this format; older files kept the same values as plain entries.
    progress = json.loads(saved[PROGRESS_KEY]) if PROGRESS_KEY in saved else saved
    return saved, {"step": int(progress["step"]), "history": list(progress["history"]),
                   "config": dict(progress.get("config", {}))}


def read_training_progress(path: Path) -> dict[str, Any]:
    """The progress recorded in a training state file, without loading it into a model.

    Returns:
        ``{"step": steps done, "history": logged records, "config": the run's settings as a dict}``.

    Raises:
        ValueError: see :func:`load_training_state`.
    """
    return _read_state(path)[1]


def load_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
) -> tuple[TrainState, dict[str, Any]]:
    """Load a training state written by :func:`save_training_state` into ``model`` and ``optimizer``.

    Returns:
        (the saved :class:`TrainState`, the saved settings as a dict; empty when absent).

    Raises:
        ValueError: the file holds pickled objects other than tensors and plain containers
            (``torch.load(weights_only=True)`` refuses them: nothing in it is run), or is not
            a training state.
    """
    saved, progress = _read_state(path, next(model.parameters()).device)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(progress["step"], progress["history"]), progress["config"]


def append_history(path: Path, record: dict[str, Any]) -> None:
    """Append one record to ``history.jsonl`` as a JSON line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_history(path: Path, last_step: int) -> None:
    """Keep only the lines of ``history.jsonl`` up to ``last_step`` (atomic rewrite; no file, no change)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= last_step]
    with atomic_write(path) as temp:
        temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
