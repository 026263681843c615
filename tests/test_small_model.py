"""The small model shipped in the package (``vit_small``): present, offline, and useful.

It was trained by ``experiments/train_small_model.py``; quality figures come from
``experiments/eval_small_model.py`` (see the README). These tests check what a fresh
offline install relies on.
"""

from __future__ import annotations

import socket

import numpy as np
import pooch
import pytest
from skimage.draw import ellipse

from napari_sam import SamPredictor, checkpoints
from napari_sam.build import MODEL_CONFIGS, detect_model_type, read_state_dict
from napari_sam.checkpoints import CACHE_DIR_ENV, MIRROR_ENV, SMALL_MODEL_FILE, build_sam, default_model_type
from napari_sam.cli import main as main_amg
from napari_sam.training.checkpointing import read_training_progress
from napari_sam.training.evaluation import coins_ground_truth


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache folder, a mirror that does not exist, and no network connections."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/nowhere")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "cache"


def test_bundled_file_is_small_and_has_its_known_hash():
    assert SMALL_MODEL_FILE.is_file(), "run experiments/train_small_model.py to create the bundled weights"
    assert SMALL_MODEL_FILE.stat().st_size <= 25 * 2**20
    entry = checkpoints.known_weights("vit_small")
    assert entry.bundled == SMALL_MODEL_FILE
    assert entry.known_hash == "xxh128:" + pooch.file_hash(str(SMALL_MODEL_FILE), alg="xxh128")
    assert detect_model_type(read_state_dict(SMALL_MODEL_FILE)) == "vit_small"


def test_loads_offline_and_segments_a_blob_from_one_point(offline):
    model = build_sam("vit_small", device="cpu")
    assert model.image_encoder.img_size == MODEL_CONFIGS["vit_small"].img_size
    assert not offline.exists() or not any(offline.iterdir())  # nothing downloaded or copied
    rng = np.random.default_rng(0)
    image = rng.normal(30, 6, (240, 320)).clip(0, 255)
    truth = np.zeros(image.shape, bool)
    truth[ellipse(120, 150, 25, 35, shape=image.shape, rotation=0.4)] = True  # nucleus-sized
    image[truth] += 120
    predictor = SamPredictor(model)
    predictor.set_image(image.astype(np.uint8))
    masks, scores, _ = predictor.predict(np.array([[150.0, 120.0]]), np.array([1]), multimask_output=True)
    ious = [(m & truth).sum() / (m | truth).sum() for m in masks]
    assert max(ious) >= 0.8, ious


def test_default_model_is_the_bundled_one_until_official_weights_are_cached(offline):
    assert default_model_type() == "vit_small"
    offline.mkdir(parents=True)
    (offline / checkpoints.KNOWN_WEIGHTS["vit_b"].filename).write_bytes(b"placeholder")
    assert default_model_type() == "vit_b"


def test_amg_cli_without_checkpoint_uses_the_bundled_model_offline(offline, tmp_path, capsys):
    from skimage import data, io

    io.imsave(tmp_path / "coins.png", data.coins(), check_contrast=False)
    # No thresholds given: the CLI uses the small model's own (its predicted IoUs are below
    # the reference's default 0.88, which would keep nothing).
    status = main_amg(["--input", str(tmp_path / "coins.png"), "--output", str(tmp_path / "out"),
                       "--device", "cpu", "--points-per-side", "16"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "vit_small" in captured.out and str(SMALL_MODEL_FILE) in captured.out
    expected = ", ".join(f"{k} {v}" for k, v in checkpoints.SMALL_MODEL_AMG_THRESHOLDS.items())
    assert f"Thresholds for vit_small: {expected}" in captured.out
    masks = [io.imread(p) > 0 for p in sorted((tmp_path / "out" / "coins").glob("*.png"))]
    _, truth = coins_ground_truth()
    found = 0
    for index in range(1, truth.max() + 1):
        coin = truth == index
        found += max(((m & coin).sum() / (m | coin).sum() for m in masks), default=0.0) >= 0.7
    assert truth.max() == 24 and found >= 15, found  # measured: 18 of 24


def _training_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "train_small_model.py"
    spec = importlib.util.spec_from_file_location("train_small_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_scale_and_until_run_shortened_phases_and_never_install(tmp_path, capsys):
    script = _training_script()
    before = SMALL_MODEL_FILE.stat().st_mtime_ns
    with pytest.raises(SystemExit):  # a shortened run must not replace the shipped weights
        script.main(["--scale", "0.5", "--out", str(tmp_path / "refused")])
    assert "a model trained with --scale is for comparison only: add --no-install" in capsys.readouterr().err
    for option, value in (("--lr-scale", "0.6"), ("--pe-scale", "3"), ("--images-per-step", "8"),
                          ("--until", "phase2")):
        with pytest.raises(SystemExit):
            script.main([option, value, "--out", str(tmp_path / "refused")])
        assert f"a model trained with {option} is for comparison only: add --no-install" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # every changed option is named
        script.main(["--lr-scale", "0.6", "--objects-per-image", "5", "--out", str(tmp_path / "refused")])
    assert "trained with --lr-scale, --objects-per-image is" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--objects-per-image", "0", "--no-install", "--out", str(tmp_path / "refused")])
    assert "--objects-per-image must be at least 1, got 0" in capsys.readouterr().err
    status = script.main(["--scale", "0.002", "--until", "phase2", "--no-install", "--threads", "1",
                          "--lr-scale", "0.5", "--corrective-fraction", "0.5", "--images-per-step", "2",
                          "--objects-per-image", "3", "--out", str(tmp_path / "tiny")])
    assert status == 0
    out = capsys.readouterr().out
    # 1600 and 750 steps scaled by 0.002, rounded; phase 3 never starts
    assert "phase1: 3 steps" in out and "phase2: 2 steps" in out and "phase3" not in out
    assert (tmp_path / "tiny" / "phase2" / "model.pth").is_file()
    saved = read_training_progress(tmp_path / "tiny" / "phase2" / "training_state.pt")["config"]
    assert saved["lr"] == pytest.approx(0.5 * script.PHASES[1][1].lr) and saved["corrective_fraction"] == 0.5
    assert saved["images_per_step"] == 2 and saved["objects_per_image"] == 3
    assert not (tmp_path / "tiny" / "phase3").exists()
    assert SMALL_MODEL_FILE.stat().st_mtime_ns == before
    assert not (tmp_path / "refused").exists()
