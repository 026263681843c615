"""napari-sam-embed: folders, z-stacks, failures, mismatches, and resuming after the process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("zarr", minversion="3")

import torch  # noqa: E402

from napari_sam import EmbeddingStore, SamPredictor, TileGrid, to_rgb_uint8  # noqa: E402
from napari_sam.embed_cli import main  # noqa: E402
from napari_sam.tiling import TileEmbeddings, shared_contrast_limits  # noqa: E402
from napari_sam.utils.progress import drain  # noqa: E402


def stored_embedding(path, sam, image, grid, tile_index, plane_index=0, limits=None):
    store = EmbeddingStore(path, sam, mode="r")
    tiles = TileEmbeddings(SamPredictor(sam), image, grid, contrast_limits=limits, store=store, plane_index=plane_index)
    embedding = tiles.get(grid[tile_index])
    assert tiles.loaded == [tile_index], "expected the embedding to come from the store"
    return embedding, tiles


def fresh_features(sam, tiles, tile):
    return drain(SamPredictor(sam).embedding_steps(tiles.crop_rgb(tile))).features.cpu()


def test_folder_with_a_bad_file(tmp_path, sam, truck, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    colour = np.ascontiguousarray(truck[300:380, 500:590])
    gray = np.ascontiguousarray(truck[600:660, 100:170, 1])
    Image.fromarray(colour).save(folder / "a_colour.png")
    Image.fromarray(gray).save(folder / "b_gray.png")
    (folder / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "stores"

    code = main([str(folder), "--output", str(out), "--model-type", "vit_small", "--tile-shape", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "could not read c_broken.png" in captured.err and "Skipping 'notes.txt'" in captured.err
    assert "Summary: 2 tile(s) computed, 0 already stored, 1 file(s) failed: c_broken.png" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a_colour.zarr", "b_gray.zarr"]
    for name, image in (("a_colour", colour), ("b_gray", gray)):
        # --tile-shape 0: one tile that is the whole image, the untiled embedding of SamPredictor.set_image
        grid = TileGrid(image.shape[:2], image.shape[:2], 0)
        embedding, _ = stored_embedding(out / f"{name}.zarr", sam, image, grid, 0)
        predictor = SamPredictor(sam)
        predictor.set_image(to_rgb_uint8(image))
        assert torch.equal(embedding.features, predictor.features.cpu())
        assert embedding.original_size == image.shape[:2] and embedding.input_size == predictor.input_size

    # a second run computes nothing and the good files pass
    (folder / "c_broken.png").unlink()
    assert main([str(folder), "--output", str(out), "--model-type", "vit_small", "--tile-shape", "0",
                 "--no-progress"]) == 0
    assert "Summary: 0 tile(s) computed, 2 already stored, 0 file(s) failed" in capsys.readouterr().out


def test_z_stack_tiff_planes_in_one_store(tmp_path, sam, truck, capsys):
    import tifffile

    gray = truck[200:270, 300:380].mean(axis=2)
    stack = np.stack([(gray * (40 + 10 * z) + 500 * z) for z in range(3)]).astype(np.uint16)  # (3, 70, 80)
    tifffile.imwrite(tmp_path / "cells.tif", stack, photometric="minisblack", metadata={"axes": "ZYX"})
    store = tmp_path / "cells.zarr"
    assert main([str(tmp_path / "cells.tif"), "-o", str(store), "--model-type", "vit_small", "--tile-shape", "48",
                 "--halo", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    limits = shared_contrast_limits(stack.reshape(-1, stack.shape[2]))  # one mapping for the whole stack
    assert f"contrast limits {limits[0]:g},{limits[1]:g}" in out
    grid = TileGrid((70, 80), 48, 6)
    assert f"Summary: {3 * len(grid)} tile(s) computed, 0 already stored" in out
    reader = EmbeddingStore(store, mode="r")
    reader.check_image(grid, np.uint16)
    assert reader.completed(limits).shape == (3, len(grid)) and reader.completed(limits).all()
    assert reader.info()["dtype"] == "uint16" and reader.info()["tile_shape"] == [48, 48]
    for z in (0, 2):
        embedding, tiles = stored_embedding(store, sam, stack[z], grid, len(grid) - 1, plane_index=z, limits=limits)
        assert torch.equal(embedding.features, fresh_features(sam, tiles, grid[len(grid) - 1]))


def test_mismatched_store_fails_the_file_unless_recomputed(tmp_path, sam, truck, capsys):
    from PIL import Image

    image = np.ascontiguousarray(truck[100:160, 100:170])
    Image.fromarray(image).save(tmp_path / "img.png")
    store = str(tmp_path / "img.zarr")
    common = [str(tmp_path / "img.png"), "--output", store, "--model-type", "vit_small", "--no-progress"]
    assert main(common + ["--tile-shape", "0"]) == 0
    capsys.readouterr()
    assert main(common + ["--tile-shape", "48", "--halo", "4"]) == 1
    err = capsys.readouterr().err
    assert "tile shape (60, 70) vs (48, 48); halo (0, 0) vs (4, 4)" in err and "--recompute-mismatched" in err
    assert main(common + ["--tile-shape", "48", "--halo", "4", "--recompute-mismatched"]) == 0
    assert EmbeddingStore(store, mode="r").info()["tile_shape"] == [48, 48]
    assert main(common + ["--tile-shape", "0", "--overwrite"]) == 0
    assert "Summary: 1 tile(s) computed, 0 already stored" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments",
    [
        ["--tile-shape", "abc"],
        ["--tile-shape", "64", "--halo", "32"],
        ["--tile-shape", "0", "--halo", "8"],
        ["--overwrite", "--recompute-mismatched"],
        ["--contrast-limits", "5,1"],
    ],
)
def test_usage_errors_exit_2(tmp_path, arguments):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    with pytest.raises(SystemExit) as caught:
        main([str(image), "--output", str(tmp_path / "x.zarr"), *arguments])
    assert caught.value.code == 2


def test_missing_input_and_unusable_output_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nothing.png"), "--output", str(tmp_path / "x.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "taken").write_text("a file")
    assert main([str(tmp_path / "x.png"), "--output", str(tmp_path / "taken")]) == 2
    assert "is not a zarr store" in capsys.readouterr().err


def _stored_count(path) -> int:
    import zarr

    try:
        root = zarr.open_group(path, mode="r")
        groups = list(root.groups())
        if not groups:
            return 0
        return int(np.asarray(groups[0][1]["content"][...] != 0).any(axis=-1).sum())
    except Exception:  # not created yet, or metadata being written
        return 0


@pytest.mark.slow
def test_resume_after_the_process_is_killed(tmp_path, sam, truck, capsys):
    """SIGKILL mid-run, rerun: only the missing tiles are computed, every stored one is exact and loads."""
    from PIL import Image

    image = np.ascontiguousarray(truck[300:540, 400:688])  # 240 x 288: 5 x 6 = 30 tiles of 64 px, halo 8
    Image.fromarray(image).save(tmp_path / "scan.png")
    grid = TileGrid(image.shape[:2], 64, 8)
    assert len(grid) == 30
    store = tmp_path / "scan.zarr"
    arguments = [str(tmp_path / "scan.png"), "--output", str(store), "--model-type", "vit_small",
                 "--tile-shape", "64", "--halo", "8", "--no-progress",
                 # tiles are recomputed below in this process: the same torch threads give the same sums
                 # (an OMP_NUM_THREADS left by an earlier test would otherwise reach the child)
                 "--threads", str(torch.get_num_threads())]
    process = subprocess.Popen(
        [sys.executable, "-m", "napari_sam.embed_cli", *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    try:
        while _stored_count(store) < 4:
            assert process.poll() is None, f"napari-sam-embed ended early:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "no tile was stored within 300 s"
            time.sleep(0.2)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    before = _stored_count(store)
    assert 4 <= before < 30, f"expected the kill to interrupt the run, {before} of 30 tiles were stored"

    assert main(arguments) == 0
    out = capsys.readouterr().out
    print(f"killed after {before} of 30 tiles were stored; the rerun: {out.splitlines()[-1]}")
    assert f"Summary: {30 - before} tile(s) computed, {before} already stored, 0 file(s) failed" in out
    store_reader = EmbeddingStore(store, sam, mode="r")
    tiles = TileEmbeddings(SamPredictor(sam), image, grid, store=store_reader)
    assert store_reader.completed(None).all()
    for tile in grid:  # every chunk loads (none is corrupt) and equals a fresh computation bit for bit
        assert torch.equal(tiles.get(tile).features, fresh_features(sam, tiles, tile)), f"tile {tile.index} differs"
    assert tiles.loaded == list(range(30)) and tiles.computed == []
