"""napari-sam-embed on dask.distributed (napari_sam.batch.run_embed_batch, --workers/--scheduler).

A real LocalCluster (2 worker processes x 1 torch thread on 127.0.0.1) embeds a folder of 8 files
with the bundled vit_small (7 RGB crops of 240 x 300 and a uint16 2-plane TIFF stack; tiles of
128 px with a 16 px halo: 12 tiles per plane), one task per file and store. Checked against the
one-process ``napari-sam-embed`` with one torch thread: every store's features equal bit for bit,
the same content hashes and attributes; a truncated image fails alone on its worker and is listed;
a second run computes nothing; a worker killed between a tile's features and its completion mark
is replaced, the file's store resumes (only the missing tiles are computed) and no tile is corrupt.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("zarr", minversion="3")

import torch  # noqa: E402

from napari_sam import embed_cli  # noqa: E402

DATA = Path(__file__).parent / "data" / "images"
TILING = ["--model-type", "vit_small", "--tile-shape", "128", "--halo", "16", "--no-progress"]
N_FILES = 8
TILES = 12  # TileGrid((240, 300), 128, 16): cores of 96 px, 3 rows x 4 columns
NAMES = [f"img{i}.png" for i in range(N_FILES - 1)] + ["stack.tif"]


def _store(path: Path) -> dict:
    """A store's root attributes, and per display-mapping group its attributes, content hashes and
    features, read with zarr directly (every chunk is read: a corrupt one would raise)."""
    import zarr

    root = zarr.open_group(path, mode="r")
    groups = {}
    for name, group in sorted(root.groups()):
        groups[name] = (dict(group.attrs), np.asarray(group["content"][...]), np.asarray(group["features"][...]))
    return {"attrs": dict(root.attrs), "groups": groups}


def _assert_same_stores(folder: Path, reference: Path, names=NAMES) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".zarr") == sorted(
        Path(n).stem + ".zarr" for n in names)
    for name in names:
        store = Path(name).stem + ".zarr"
        got, expected = _store(folder / store), _store(reference / store)
        assert got["attrs"] == expected["attrs"], store
        assert got["groups"].keys() == expected["groups"].keys(), store
        for group, (attrs, content, features) in expected["groups"].items():
            got_attrs, got_content, got_features = got["groups"][group]
            assert got_attrs == attrs and np.array_equal(got_content, content), f"{store}/{group}"
            assert got_features.shape == features.shape
            for plane in range(features.shape[0]):
                for tile in range(features.shape[1]):
                    assert torch.equal(torch.from_numpy(got_features[plane, tile]),
                                       torch.from_numpy(features[plane, tile])), f"{store} plane {plane} tile {tile}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    import tifffile
    from PIL import Image

    folder = tmp_path_factory.mktemp("slides")
    sources = [Image.open(DATA / name).convert("RGB") for name in ("truck.jpg", "groceries.jpg")]
    for i in range(N_FILES - 1):
        image = sources[i % 2]
        x, y = (i * 97) % (image.width - 300), (i * 53) % (image.height - 240)
        image.crop((x, y, x + 300, y + 240)).save(folder / f"img{i}.png")
    gray = np.asarray(sources[0].convert("L"), dtype=np.float64)[100:340, 200:500]
    stack = np.stack([gray * 40 + 300, gray[::-1] * 55 + 900]).astype(np.uint16)  # (2, 240, 300) ZYX
    tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack", metadata={"axes": "ZYX"})
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The one-process napari-sam-embed's stores with one torch thread (as each worker has)."""
    output = tmp_path_factory.mktemp("one-process") / "stores"
    threads = torch.get_num_threads()
    try:
        assert embed_cli.main([str(images), "--output", str(output), "--threads", "1", *TILING]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in NAMES:
        store = _store(output / (Path(name).stem + ".zarr"))
        (group, (_, content, features)), = store["groups"].items()
        planes = 2 if name == "stack.tif" else 1
        assert content.shape == (planes, TILES, 2) and (content != 0).any(axis=-1).all()  # every tile stored
        assert np.abs(features).sum(axis=(2, 3, 4)).min() > 0  # real embeddings, not the fill value
    return output


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    from napari_sam.batch import WORKER_DASK_CONFIG

    with dask.config.set(WORKER_DASK_CONFIG), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
        memory_limit="2GiB",
    ) as cluster, Client(cluster) as client:
        yield client


def _model():
    from napari_sam.batch import ModelChoice
    from napari_sam.cli import resolve_checkpoint

    return ModelChoice(*resolve_checkpoint("vit_small", None), threads=1)


def test_without_dask_workers_flag_says_how_to_install(images, tmp_path):
    code = (
        "import sys; sys.modules['distributed'] = None; from napari_sam.embed_cli import main; "
        f"sys.exit(main([{str(images)!r}, '--output', {str(tmp_path / 'out')!r}, '--workers', '2']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "napari-sam-embed: error: --workers and --scheduler need dask.distributed: " \
           "pip install 'napari-sam[distributed]'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_scheduler_same_stores_corrupt_image_fails_alone(images, reference, client, tmp_path, capsys):
    folder = tmp_path / "slides"
    folder.mkdir()
    for image in images.iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
    whole = (images / "img0.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])  # its header reads, its pixels do not: fails on a worker
    output = tmp_path / "stores"
    args = [str(folder), "--output", str(output), "--scheduler", client.scheduler.address, "--threads", "1", *TILING]
    assert embed_cli.main(args) == 1
    captured = capsys.readouterr()
    print(captured.out + captured.err)
    assert f"{N_FILES} done ({N_FILES * TILES + TILES} tiles computed), 0 skipped, 1 failed" in captured.err
    assert "cut.png: could not read cut.png: OSError: image file is truncated" in captured.err
    _assert_same_stores(output, reference)  # and no store for cut.png (its pixels are read before the store opens)

    assert embed_cli.main(args) == 1  # again: every store is complete, nothing is computed; cut.png still fails
    captured = capsys.readouterr()
    assert f"0 done (0 tiles computed), {N_FILES} skipped, 1 failed" in captured.err
    _assert_same_stores(output, reference)


def test_killed_worker_resumes_its_store_and_second_run_skips(images, reference, client, tmp_path):
    """A worker kills itself (SIGKILL) after writing the features of img3's tile 4, before its content
    hash (the mark that a tile is complete): dask gives img3 to a worker again, which resumes the store."""
    from distributed.diagnostics.plugin import WorkerPlugin

    from napari_sam.batch import run_embed_batch

    marker = tmp_path / "killed"

    class KillBeforeCompletionMark(WorkerPlugin):  # a local class: cloudpickle sends it by value
        name = "kill-before-completion-mark"

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def setup(self, worker) -> None:
            import os
            import signal

            from napari_sam.embedding_store import EmbeddingStore

            marker = self.marker
            original = EmbeddingStore._group  # white box: the store's arrays of one display mapping

            class Trap:
                """The content-hash array of img3's store: dies instead of marking tile 4 complete."""

                def __init__(self, array) -> None:
                    self.array = array

                def __getattr__(self, name):
                    return getattr(self.array, name)

                def __getitem__(self, key):
                    return self.array[key]

                def __setitem__(self, key, value) -> None:
                    if key[1] == 4 and np.any(np.asarray(value) != 0) and not os.path.exists(marker):
                        with open(marker, "w") as file:
                            file.write(f"killed before the hash of tile {key}")
                        os.kill(os.getpid(), signal.SIGKILL)
                    self.array[key] = value

            def trapped(store, limits, create):
                found = original(store, limits, create)
                if found is not None and store.path.name == "img3.zarr" and not isinstance(found.content, Trap):
                    found.content = Trap(found.content)
                return found

            EmbeddingStore._group = trapped

    client.register_plugin(KillBeforeCompletionMark(str(marker)))
    try:
        output = tmp_path / "stores"
        result = run_embed_batch(images, output, model=_model(), client=client, tile_shape=128, halo=16,
                                 progress=False)
    finally:
        client.unregister_worker_plugin(KillBeforeCompletionMark.name)
    assert marker.exists(), "the worker was not killed: the fault injection no longer reaches the store's writes"
    print(result.summary(), {item.name: (item.computed, item.stored) for item in result.done})
    assert (sorted(item.name for item in result.done), result.skipped, result.failed) == (sorted(NAMES), [], {})
    img3 = next(item for item in result.done if item.name == "img3.png")
    assert (img3.computed, img3.stored) == (TILES - 4, 4)  # resumed: tiles 0-3 were complete, tile 4 was not
    _assert_same_stores(output, reference)
    client.wait_for_workers(2, timeout=60)

    again = run_embed_batch(images, output, model=_model(), client=client, tile_shape=128, halo=16, progress=False)
    assert (again.done, sorted(again.skipped), again.failed) == ([], sorted(NAMES), {})
    assert again.summary() == f"0 done (0 tiles computed), {N_FILES} skipped, 0 failed"
    _assert_same_stores(output, reference)


def test_cli_workers_starts_a_local_cluster(images, reference, tmp_path, capsys):
    """--workers 2 (with --memory-limit and --resources, which the local workers get) on two files."""
    folder = tmp_path / "slides"
    folder.mkdir()
    names = ["img0.png", "stack.tif"]
    for name in names:
        (folder / name).write_bytes((images / name).read_bytes())
    output = tmp_path / "stores"
    args = [str(folder), "--output", str(output), "--workers", "2", "--threads", "1", "--memory-limit", "2GiB",
            "--resources", "GPU=1", *TILING]
    assert embed_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "local dask cluster of 2 worker(s) x 1 torch thread(s), 2.0 GiB each" in out
    assert f"Done: 2 done ({3 * TILES} tiles computed), 0 skipped, 0 failed" in out
    _assert_same_stores(output, reference, names)


def test_run_embed_batch_in_this_process_on_one_file(images, reference, tmp_path):
    """Without a client: in this process; one image file -> output is the store itself."""
    from napari_sam.batch import run_embed_batch

    threads = torch.get_num_threads()
    try:
        result = run_embed_batch(images / "img5.png", tmp_path / "img5.zarr", model=_model(), tile_shape=128,
                                 halo=16, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert ([(item.name, item.computed) for item in result.done], result.failed) == ([("img5.png", TILES)], {})
    _assert_same_stores(tmp_path, reference, ["img5.png"])
    with pytest.raises(ValueError, match="halo"):
        run_embed_batch(images / "img5.png", tmp_path / "x.zarr", model=_model(), tile_shape=64, halo=32)
