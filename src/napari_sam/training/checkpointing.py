"""The files of a training run folder: resumable training state, loss history, final weights.

``training_state.pt`` holds the model and optimizer state dicts, the number of steps done,
the logged history and the run's :class:`~napari_sam.training.config.TrainConfig` (as a
dict); ``history.jsonl`` one JSON line of losses per logged step; ``model.pth`` a plain SAM
state dict. Every write is atomic: a temporary file, then a rename.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.files import atomic_write
from .config import TrainConfig

STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.jsonl"
MODEL_FILE = "model.pth"


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
    save_atomic(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
         "history": state.history, "config": asdict(config)},
        path,
    )


def load_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
) -> tuple[TrainState, dict[str, Any]]:
    """Load a training state written by :func:`save_training_state` into ``model`` and ``optimizer``.

    Returns:
        (the saved :class:`TrainState`, the saved settings as a dict; empty when absent).
    """
    saved = torch.load(path, map_location=next(model.parameters()).device, weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(saved["step"], saved["history"]), saved.get("config", {})


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
