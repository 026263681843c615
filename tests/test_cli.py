"""``napari-sam-amg`` end to end: in-process through ``main(argv)`` and once as the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_sam.cli import METADATA_HEADER, main

FAST = ["--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--box-nms-thresh", "1.0", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, truck) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    photo = np.ascontiguousarray(truck[300:900:4, 400:1300:4])  # 150 x 225 RGB
    Image.fromarray(photo).save(folder / "photo.jpg", quality=95)
    Image.fromarray(photo[..., 0]).save(folder / "gray.png")
    import tifffile

    tifffile.imwrite(folder / "deep.tif", (photo[..., 1].astype(np.uint16) * 200 + 7))
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> str:
    return str(checkpoint_factory("vit_test"))


def _read_metadata(folder: Path) -> list[list[str]]:
    text = (folder / "metadata.csv").read_text()
    lines = text.split("\n")
    assert lines[0] == METADATA_HEADER and not text.endswith("\n")
    return [line.split(",") for line in lines[1:]]


def test_folder_to_pngs_and_metadata(inputs, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["--input", str(inputs), "--output", str(out), "--checkpoint", checkpoint, *FAST])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "notes.txt" in captured.err and "not an image" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["deep", "gray", "photo"]  # no temp leftovers
    for stem, shape in [("photo", (150, 225)), ("gray", (150, 225)), ("deep", (150, 225))]:
        rows = _read_metadata(out / stem)
        assert len(rows) > 0 and all(len(r) == 14 for r in rows)
        pngs = sorted((out / stem).glob("*.png"), key=lambda p: int(p.stem))
        assert [p.stem for p in pngs] == [r[0] for r in rows] == [str(i) for i in range(len(rows))]
        for png, row in zip(pngs, rows):
            mask = np.asarray(Image.open(png))
            assert mask.dtype == np.uint8 and mask.shape == shape
            assert set(np.unique(mask)) <= {0, 255}
            assert int(row[1]) == int((mask == 255).sum())  # area column


def test_metadata_equals_generator_records(inputs, checkpoint, tmp_path, capsys):
    from napari_sam import SamAutomaticMaskGenerator, sam_model_registry

    out = tmp_path / "out"
    assert main(["--input", str(inputs / "gray.png"), "--output", str(out), "--checkpoint", checkpoint,
                 "--model-type", "vit_test", *FAST]) == 0
    generator = SamAutomaticMaskGenerator(
        sam_model_registry["vit_test"](checkpoint=checkpoint), points_per_side=3, pred_iou_thresh=0.0,
        stability_score_thresh=0, box_nms_thresh=1.0,
    )
    records = generator.generate(np.asarray(Image.open(inputs / "gray.png")))
    rows = _read_metadata(out / "gray")
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        expected = [record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"],
                    record["stability_score"], *record["crop_box"]]
        assert row[1:] == [str(v) for v in expected]


def test_existing_output_refused_then_overwritten(inputs, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", str(inputs / "photo.jpg"), "--output", str(out), "--checkpoint", checkpoint, *FAST]
    assert main(args) == 0
    before = (out / "photo" / "metadata.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "photo" / "metadata.csv").stat().st_mtime_ns == before
    assert main(args + ["--overwrite", "--crop-overlap-ratio", "0.25", "--crop-n-layers", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo"]


def test_rle_json_and_failing_image(inputs, checkpoint, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    folder = tmp_path / "in"
    shutil.copytree(inputs, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    status = main(["--input", str(folder), "--output", str(out), "--checkpoint", checkpoint,
                   "--convert-to-rle", *FAST])
    err = capsys.readouterr().err
    assert status == 1 and "broken.png" in err
    assert sorted(p.name for p in out.iterdir()) == ["deep.json", "gray.json", "photo.json"]
    records = json.loads((out / "photo.json").read_text())
    assert len(records) > 0
    for record in records:
        mask = mask_utils.decode(dict(record["segmentation"], counts=record["segmentation"]["counts"].encode()))
        assert mask.shape == (150, 225) and int(mask.sum()) == record["area"]
        assert set(record) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                               "stability_score", "crop_box"}


def test_without_checkpoint_known_weights_are_fetched_and_offline_error_is_clear(
    inputs, tmp_path, capsys, monkeypatch
):
    """--model-type vit_b without --checkpoint: the known weights come from the cache folder;
    offline (a mirror on a closed local port) the error names the file and the folder for a
    manual download. (Without --model-type the bundled vit_small is used: test_small_model.)"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(cache))
    monkeypatch.setenv("NAPARI_SAM_MIRROR", "http://127.0.0.1:9")
    status = main(["--input", str(inputs / "photo.jpg"), "--output", str(tmp_path / "o"), "--model-type", "vit_b"])
    err = capsys.readouterr().err
    assert status == 2
    assert "sam_vit_b_01ec64.pth" in err and str(cache) in err
    assert not (tmp_path / "o").exists()


def test_model_type_is_detected_from_the_checkpoint(inputs, checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["--input", str(inputs / "photo.jpg"), "--output", str(out), "--checkpoint", checkpoint, *FAST]) == 0
    assert len(_read_metadata(out / "photo")) > 0


def test_unknown_model_type_is_a_usage_error(inputs, tmp_path, capsys):
    status = main(["--input", str(inputs / "photo.jpg"), "--output", str(tmp_path / "o"), "--model-type", "vit_x"])
    assert status == 2 and "vit_x" in capsys.readouterr().err


def test_console_script(inputs, checkpoint, tmp_path):
    script = Path(sys.executable).with_name("napari-sam-amg")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "napari_sam.cli"]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "out"
    result = subprocess.run(
        [*command, "--input", str(inputs / "photo.jpg"), "--output", str(out), "--checkpoint", checkpoint, *FAST],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Done!" in result.stdout
    assert len(_read_metadata(out / "photo")) > 0
