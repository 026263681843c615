"""No file that napari-sam loads can run code: ``torch.load(weights_only=True)``, and for model
checkpoints that it refuses (training checkpoints with non-tensor state) a restricted unpickler
that turns every class or function it does not trust into an inert placeholder.

Each test plants a pickle whose payload creates a marker file when unpickled (as a tampered
checkpoint or run folder would run a command), loads it through one of the package's
loading paths, and checks that the payload never ran and that loading either fails with a
clear error or gives exactly the file's tensors.
"""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from napari_sam import build_sam
from napari_sam.build import MODEL_CONFIGS, CheckpointError, build_sam_from_config
from napari_sam.models import create_model, detect_model_type, read_state_dict
from napari_sam.training.checkpointing import STATE_FILE, TrainState, load_training_state, save_training_state
from napari_sam.training.config import TrainConfig
from napari_sam.training.data import SyntheticData
from napari_sam.training.trainer import train


class _Payload:
    """Unpickling this object creates ``marker`` (stands for any command an attacker picks)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return build_sam_from_config(MODEL_CONFIGS["vit_test"])


def _plant(path: Path, content: dict, marker: Path) -> Path:
    torch.save({**content, "extra": _Payload(marker)}, path)
    return path


def test_the_payload_is_live_when_loaded_unsafely(tmp_path, tiny):
    """The planted files would run code through a plain ``torch.load``: the tests below can fail."""
    marker = tmp_path / "ran"
    path = _plant(tmp_path / "evil.pth", tiny.state_dict(), marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _same_tensors(model, reference) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_model_checkpoints_never_run_code(tmp_path, tiny):
    """Read with weights_only=True, then (for what it refuses) by the restricted unpickler: the
    payload becomes an inert placeholder. A file is refused clearly (a stray non-tensor entry
    in a bare state dict) or gives the right tensors; the payload never runs."""
    marker = tmp_path / "ran"
    path = _plant(tmp_path / "sam_vit_b_01ec64.pth", tiny.state_dict(), marker)
    fine_tuned = _plant(tmp_path / "model.pth", {"model": tiny.state_dict()}, marker)  # a training output's layout
    outcomes = []
    for load in (
        lambda: build_sam(checkpoint=path),
        lambda: build_sam("vit_test", checkpoint=fine_tuned),
        lambda: create_model("auto", path),
        lambda: create_model(str(fine_tuned)),
        lambda: detect_model_type(read_state_dict(path)),
        lambda: read_state_dict(fine_tuned),
    ):
        try:
            result = load()
        except CheckpointError as error:
            assert "does not hold a state dict" in str(error) and "'extra'" in str(error)
            outcomes.append("refused")
            continue
        if isinstance(result, torch.nn.Module):
            assert _same_tensors(result, tiny)
        elif isinstance(result, dict):
            assert result.keys() == tiny.state_dict().keys()
        outcomes.append("loaded")
    assert not marker.exists()
    assert "loaded" in outcomes and "refused" in outcomes  # the fine-tuned layout loads, the bare one is refused


def test_a_torch_em_checkpoint_with_a_payload_loads_its_tensors_only(tmp_path, tiny):
    """micro-sam's training-checkpoint layout (state dict under "model_state", keys prefixed
    "sam.", beside non-tensor training state) with a payload among the training state."""
    marker = tmp_path / "ran"
    path = tmp_path / "best.pt"
    sam_state = {f"sam.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"model_state": sam_state, "iteration": 3, "optimizer_state": {"lr": 1e-5},
                "scheduler": _Payload(marker), "config": {"payload": [_Payload(marker)]}}, path)
    for load in (lambda: build_sam("vit_test", checkpoint=path), lambda: create_model(str(path), device="cpu")):
        assert _same_tensors(load(), tiny)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the same file, loaded unsafely, does run it
    assert marker.exists()


def _config() -> TrainConfig:
    return TrainConfig(steps=2, images_per_step=1, objects_per_image=2, iterations=1, checkpoint_every=1,
                       min_object_area=4, seed=1)


def test_training_resume_never_runs_code(tmp_path, tiny):
    marker = tmp_path / "ran"
    optimizer = torch.optim.AdamW(tiny.parameters())
    run = tmp_path / "run"
    run.mkdir()
    _plant(run / STATE_FILE, {"model": tiny.state_dict(), "optimizer": optimizer.state_dict(), "step": 1,
                              "history": [], "config": {}}, marker)
    with pytest.raises(ValueError, match="never run"):
        load_training_state(run / STATE_FILE, tiny, optimizer)
    with pytest.raises(ValueError, match="never run"):
        train(tiny, SyntheticData(seed=1), _config(), run)  # resumes from the planted state
    assert not marker.exists()


def test_training_state_round_trip_keeps_progress_and_settings(tmp_path, tiny):
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    history = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    save_training_state(tmp_path / STATE_FILE, tiny, optimizer, TrainState(2, history), _config())
    other = build_sam_from_config(MODEL_CONFIGS["vit_test"])
    state, settings = load_training_state(tmp_path / STATE_FILE, other, torch.optim.AdamW(other.parameters()))
    assert state.step == 2 and state.history == history
    assert settings["seed"] == 1 and settings["steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), other.state_dict().values()))
