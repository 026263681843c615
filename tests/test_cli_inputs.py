"""``napari-sam-amg`` on bad or unusual inputs and outputs (issue 29): stacks, unreadable files,
out-of-bounds flags, unwritable outputs, killed runs, the umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sam.cli import main
from napari_sam.utils.imread import ImageReadError, probe_image, read_planes

FAST = ["--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--box-nms-thresh", "1.0", "--device", "cpu", "--model-type", "vit_test"]


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory) -> str:
    return str(checkpoint_factory("vit_test"))


@pytest.fixture(scope="module")
def gray(truck) -> np.ndarray:
    """A small real grayscale image (40 x 60)."""
    return np.ascontiguousarray(truck[300:900:15, 400:1300:15, 1])


def slices(gray: np.ndarray, count: int) -> np.ndarray:
    """count distinct 16-bit slices."""
    return np.stack([gray.astype(np.uint16) * 200 + 50 * i for i in range(count)])


# --- 1. z-stacks are stacks, never colour ------------------------------------------------------------


def test_probe_tiff_axes_decide_stack_or_colour(tmp_path, gray):
    """Pages, ImageJ Z, OME ZC and unlabelled pages are iterated; only S (photometric RGB) is colour."""
    paths = {}
    for count in (3, 4):
        paths[f"pages{count}"] = tmp_path / f"pages{count}.tif"
        tifffile.imwrite(paths[f"pages{count}"], slices(gray, count), photometric="minisblack")
    paths["appended"] = tmp_path / "appended.tif"
    for plane in slices(gray, 3):  # one page (one tifffile series) at a time
        tifffile.imwrite(paths["appended"], plane, append=True)
    paths["imagej"] = tmp_path / "imagej.tif"
    tifffile.imwrite(paths["imagej"], slices(gray, 3), imagej=True, metadata={"axes": "ZYX"})
    paths["ome"] = tmp_path / "ome.ome.tif"
    tifffile.imwrite(paths["ome"], np.stack([slices(gray, 2)] * 3, axis=1), ome=True, metadata={"axes": "ZCYX"})
    paths["rgb"] = tmp_path / "rgb.tif"
    tifffile.imwrite(paths["rgb"], np.stack([gray] * 3, axis=-1), photometric="rgb")
    paths["no_suffix"] = tmp_path / "stack_without_suffix"
    paths["no_suffix"].write_bytes(paths["pages4"].read_bytes())  # found by its TIFF magic bytes

    layouts = {name: probe_image(path) for name, path in paths.items()}
    assert {n: (l.stack_axes, l.stack_shape, l.samples) for n, l in layouts.items()} == {
        "pages3": (layouts["pages3"].stack_axes, (3,), 1),
        "pages4": (layouts["pages4"].stack_axes, (4,), 1),
        "appended": ("I", (3,), 1),
        "imagej": ("Z", (3,), 1),
        "ome": ("ZC", (2, 3), 1),
        "rgb": ("", (), 3),
        "no_suffix": (layouts["pages4"].stack_axes, (4,), 1),
    }
    assert layouts["pages3"].stack_axes in ("I", "Q") and layouts["pages4"].stack_axes in ("I", "Q")  # unlabelled
    assert [layouts["pages4"].suffix(i) for i in layouts["pages4"].indices] == ["_z000", "_z001", "_z002", "_z003"]
    assert layouts["ome"].suffix((1, 2)) == "_z001_c002" and layouts["rgb"].suffix(()) == ""
    planes = dict(read_planes(layouts["pages4"]))
    assert sorted(planes) == [(0,), (1,), (2,), (3,)]
    np.testing.assert_array_equal(planes[(3,)], slices(gray, 4)[3])  # the 4th slice is not dropped
    (index, rgb), = read_planes(layouts["rgb"])
    assert index == () and rgb.shape == (*gray.shape, 3)


def test_planar_rgb_written_by_tifffiles_default_is_colour_with_a_note(tmp_path, gray):
    """tifffile stores a (3, H, W) array as planar RGB unless told otherwise: the file then says RGB,
    so it is read as colour, with a note on how to save a stack."""
    path = tmp_path / "planar.tif"
    with pytest.warns(DeprecationWarning):
        tifffile.imwrite(path, slices(gray, 3))
    layout = probe_image(path)
    assert (layout.stack_axes, layout.samples) == ("", 3)
    assert any("photometric='minisblack'" in note for note in layout.notes)


def test_other_formats_through_imageio(tmp_path, gray):
    Image.fromarray(np.stack([gray, gray], axis=-1), "LA").save(tmp_path / "la.png")
    frames = [Image.fromarray(gray + 10 * i) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(gray[:3, :]).save(tmp_path / "three_rows.png")  # a dimension of 3 is not channels
    la = probe_image(tmp_path / "la.png")
    (_, plane), = read_planes(la)
    np.testing.assert_array_equal(plane, gray)  # gray + alpha: the gray
    anim = probe_image(tmp_path / "anim.gif")
    assert anim.stack_shape == (3,) and anim.suffix((2,)) == "_z002"
    rows = probe_image(tmp_path / "three_rows.png")
    assert (rows.height, rows.width, rows.samples, rows.stack_axes) == (3, 60, 1, "")


def test_unreadable_files_say_could_not_read(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageReadError, match=r"could not read empty.png: the file is empty \(0 bytes\)"):
        probe_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="could not read junk.png: .*PNG"):
        probe_image(tmp_path / "junk.png")
    with pytest.raises(ImageReadError, match="could not read text.png") as info:
        probe_image(tmp_path / "text.png")
    assert "pip install" not in str(info.value)


def test_tiff_stack_segmented_per_slice(tmp_path, gray, checkpoint, capsys):
    """A 4-page 16-bit TIFF gives 4 outputs (not one RGBA image), an RGB TIFF one; per format."""
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "cells.tif", slices(gray, 4), photometric="minisblack")
    tifffile.imwrite(folder / "rgb.tif", np.stack([gray] * 3, axis=-1), photometric="rgb")
    out = tmp_path / "out"
    assert main(["--input", str(folder), "--output", str(out), "--checkpoint", checkpoint, *FAST]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["cells_z000", "cells_z001", "cells_z002", "cells_z003", "rgb"]
    assert "4 planes" in captured.out
    for png in (out / "cells_z003").glob("*.png"):
        assert np.asarray(Image.open(png)).shape == gray.shape

    out_json = tmp_path / "json"
    assert main(["--input", str(folder / "cells.tif"), "--output", str(out_json), "--checkpoint", checkpoint,
                 "--convert-to-rle", *FAST]) == 0
    assert sorted(p.name for p in out_json.iterdir()) == [f"cells_z00{i}.json" for i in range(4)]

    from napari_sam.io import read_coco_json

    out_coco = tmp_path / "coco"
    assert main(["--input", str(folder / "cells.tif"), "--output", str(out_coco), "--checkpoint", checkpoint,
                 "--coco-format", "instances", *FAST]) == 0
    payload = json.loads((out_coco / "cells.json").read_text())
    assert [image["id"] for image in payload["images"]] == [1, 2, 3, 4]
    assert {a["image_id"] for a in payload["annotations"]} <= {1, 2, 3, 4}
    assert read_coco_json(out_coco / "cells.json").shape == (4, *gray.shape)


# --- 2. small ones -----------------------------------------------------------------------------------------


def test_out_of_bounds_threshold_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--input", "x", "--output", "y", "--pred-iou-thresh", "5"])
    assert info.value.code == 2
    assert "pred_iou_thresh must be <= 1.0, got 5.0" in capsys.readouterr().err


def test_bad_files_reported_and_the_others_processed(tmp_path, gray, checkpoint, capsys):
    """An empty PNG says 'could not read'; a 1 x 5000 image either works or is reported with its size."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((1, 5000), 128, np.uint8)).save(folder / "thin.png")
    Image.fromarray(gray).save(folder / "good.png")
    out = tmp_path / "out"
    status = main(["--input", str(folder), "--output", str(out), "--checkpoint", checkpoint, *FAST])
    err = capsys.readouterr().err
    assert status == 1
    assert "could not read empty.png: the file is empty" in err and "pip install" not in err
    assert (out / "good" / "metadata.csv").exists()
    if not (out / "thin").exists():  # the predictor takes too-thin images (else: reported with its size)
        assert "Failed on 'thin.png' (one 1 x 5000 image)" in err


def test_an_image_that_fails_is_reported_with_its_size_and_the_rest_go_on(
    tmp_path, gray, checkpoint, capsys, monkeypatch
):
    """Whatever fails inside the generator (here: PIL's error for a too-thin resize, as before the
    predictor handled such images) is one line naming the file and its size; exit status 1."""
    from napari_sam.automatic_mask_generator import SamAutomaticMaskGenerator

    real = SamAutomaticMaskGenerator.generate_iter

    def generate_iter(self, image, *args, **kwargs):
        if min(image.shape[:2]) < 20:
            raise ValueError("height and width must be > 0")
        return real(self, image, *args, **kwargs)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate_iter", generate_iter)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((10, 6000), 128, np.uint8)).save(folder / "a_thin.png")
    Image.fromarray(gray).save(folder / "b_good.png")
    out = tmp_path / "out"
    status = main(["--input", str(folder), "--output", str(out), "--checkpoint", checkpoint, *FAST])
    captured = capsys.readouterr()
    assert status == 1
    assert "Failed on 'a_thin.png' (one 10 x 6000 image): ValueError: height and width must be > 0" in captured.err
    assert "Traceback" not in captured.err and "Done with errors: 1 image(s) failed: a_thin.png" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["b_good"]


def _deny_writes_to(monkeypatch, folder: Path) -> None:
    """Make os.access report ``folder`` unwritable (the tests run as root, where chmod denies nothing)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).absolute() == folder.absolute() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def _forbid_compute(monkeypatch) -> None:
    from napari_sam.automatic_mask_generator import SamAutomaticMaskGenerator

    def generate_iter(self, *args, **kwargs):
        raise AssertionError("masks were computed although the output cannot be written")

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate_iter", generate_iter)


def test_unwritable_output_refused_before_any_compute(tmp_path, gray, checkpoint, capsys, monkeypatch):
    Image.fromarray(gray).save(tmp_path / "good.png")
    _forbid_compute(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_writes_to(monkeypatch, locked)
    args = ["--input", str(tmp_path / "good.png"), "--checkpoint", checkpoint, *FAST]
    assert main([*args, "--output", str(locked)]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main([*args, "--output", str(locked / "new" / "deeper")]) == 2  # under an unwritable parent
    err = capsys.readouterr().err
    assert "Cannot create --output" in err and "not writable" in err
    assert not (locked / "new").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_refused(tmp_path, gray, checkpoint, capsys, monkeypatch):
    Image.fromarray(gray).save(tmp_path / "good.png")
    _forbid_compute(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["--input", str(tmp_path / "good.png"), "--output", str(locked / "out"),
                     "--checkpoint", checkpoint, *FAST]) == 2
    finally:
        locked.chmod(0o755)
    assert "not writable" in capsys.readouterr().err


def test_output_that_is_or_lies_under_a_file(tmp_path, gray, checkpoint, capsys, monkeypatch):
    Image.fromarray(gray).save(tmp_path / "good.png")
    _forbid_compute(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = ["--input", str(tmp_path / "good.png"), "--checkpoint", checkpoint, *FAST]
    assert main([*args, "--output", str(a_file)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main([*args, "--output", str(a_file / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from napari_sam.utils.files import atomic_write
    with atomic_write(sys.argv[1], directory=True) as folder:
        (folder / "0.png").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_leftovers_of_a_killed_run_are_removed_next_run(tmp_path, gray, checkpoint, capsys):
    Image.fromarray(gray).save(tmp_path / "good.png")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out / "good")], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = out.iterdir()
    assert leftover.name.startswith(".good.napari-sam-") and (leftover / "0.png").exists()
    legacy = out / ".old.0123456789ab.tmp"  # the naming of earlier versions, two hours old
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200,) * 2)
    recent_legacy = out / ".recent.0123456789ab.tmp"
    recent_legacy.write_text("may still be written")
    live = out / f".other.napari-sam-{os.getpid()}-0123456789ab.tmp"  # a running process's: kept
    live.write_text("in use")
    theirs = out / ".notes.tmp"  # not our naming: kept
    theirs.write_text("user file")
    assert main(["--input", str(tmp_path / "good.png"), "--output", str(out), "--checkpoint", checkpoint,
                 *FAST]) == 0
    err = capsys.readouterr().err
    assert leftover.name in err and legacy.name in err
    assert sorted(p.name for p in out.iterdir()) == sorted(["good", recent_legacy.name, live.name, theirs.name])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    from napari_sam.cli import save_atomically

    record = {"segmentation": np.eye(4, dtype=bool), "area": 4, "bbox": [0, 0, 3, 3], "point_coords": [[1.0, 1.0]],
              "predicted_iou": 0.9, "stability_score": 0.9, "crop_box": [0, 0, 4, 4]}
    previous = os.umask(umask)
    try:
        save_atomically([record], tmp_path / "masks", rle=False, overwrite=False)
        save_atomically([{"k": 1}], tmp_path / "masks.json", rle=True, overwrite=False)
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "masks") == 0o777 & ~umask
    assert mode(tmp_path / "masks" / "0.png") == mode(tmp_path / "masks" / "metadata.csv") == 0o666 & ~umask
    assert mode(tmp_path / "masks.json") == 0o666 & ~umask
