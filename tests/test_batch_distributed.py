"""Batch segmentation on dask.distributed (napari_sam.batch, napari-sam-amg --workers/--scheduler).

A real LocalCluster (2 worker processes x 1 thread on 127.0.0.1) runs a folder of 8 small crops
with the bundled vit_small: outputs byte-identical to the one-process CLI, a worker killed in
the middle of writing an output changes nothing (no partial output, no temporary left), a
corrupt image fails alone and is listed, and a second run skips everything.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from napari_sam import cli  # noqa: E402

DATA = Path(__file__).parent / "data" / "images"
FLAGS = ["--model-type", "vit_small", "--points-per-side", "8", "--pred-iou-thresh", "0.3",
         "--stability-score-thresh", "0.3"]
N_IMAGES = 8


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".napari-sam-" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("screen")
    sources = [Image.open(DATA / name).convert("RGB") for name in ("truck.jpg", "groceries.jpg")]
    for i in range(N_IMAGES):
        image = sources[i % 2]
        x, y = (i * 97) % (image.width - 256), (i * 53) % (image.height - 256)
        image.crop((x, y, x + 256, y + 256)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """The one-process CLI's outputs with one torch thread (as each worker has)."""
    import torch

    output = tmp_path_factory.mktemp("one-process") / "out"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--input", str(images), "--output", str(output), "--threads", "1", *FLAGS]) == 0
    finally:
        torch.set_num_threads(threads)
    tree = _tree(output)
    assert len([name for name in tree if name.endswith("metadata.csv")]) == N_IMAGES
    assert sum(name.endswith(".png") for name in tree) > N_IMAGES  # masks were found
    return output


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    from napari_sam.batch import WORKER_DASK_CONFIG

    with dask.config.set(WORKER_DASK_CONFIG), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="2GiB") as cluster, Client(cluster) as client:
        yield client


def _model_and_settings():
    from napari_sam.amg_settings import AmgSettings
    from napari_sam.batch import ModelChoice

    model_type, checkpoint = cli.resolve_checkpoint("vit_small", None)
    settings = AmgSettings.for_model(model_type, output_mode="binary_mask", points_per_side=8,
                                     pred_iou_thresh=0.3, stability_score_thresh=0.3)
    return ModelChoice(model_type, checkpoint, threads=1), settings


def test_import_does_not_import_dask():
    code = "import sys, napari_sam.cli, napari_sam.batch; print([m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_without_dask_workers_flag_says_how_to_install(images, tmp_path):
    code = (
        "import sys; sys.modules['distributed'] = None; from napari_sam.cli import main; "
        f"sys.exit(main(['--input', {str(images)!r}, '--output', {str(tmp_path / 'out')!r}, '--workers', '2']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install 'napari-sam[distributed]'" in done.stderr


def test_cluster_outputs_identical_and_second_run_skips(images, reference, client, tmp_path):
    from napari_sam.batch import run_batch

    model, settings = _model_and_settings()
    output = tmp_path / "out"
    result = run_batch(images, output, model=model, settings=settings, client=client, progress=False)
    assert (len(result.done), result.skipped, result.failed, result.exit_status) == (N_IMAGES, [], {}, 0)
    assert _tree(output) == _tree(reference)

    again = run_batch(images, output, model=model, settings=settings, client=client, progress=False)
    assert (again.done, sorted(again.skipped), again.failed) == ([], sorted(f"img{i}.png" for i in range(N_IMAGES)), {})
    assert _tree(output) == _tree(reference)


def test_cli_scheduler_corrupt_image_fails_alone(images, reference, client, tmp_path, capsys):
    folder = tmp_path / "screen"
    folder.mkdir()
    for image in images.iterdir():
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    output = tmp_path / "out"
    args = ["--input", str(folder), "--output", str(output), "--scheduler", client.scheduler.address,
            "--threads", "1", *FLAGS]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "1 failed" in err and "bad.png: could not read bad.png" in err
    assert _tree(output) == _tree(reference)

    assert cli.main(args) == 1  # resumed: everything complete is skipped, bad.png still fails
    captured = capsys.readouterr()
    assert f"0 done (0 masks), {N_IMAGES} skipped, 1 failed" in captured.err
    assert _tree(output) == _tree(reference)


def test_killed_worker_is_retried_without_partial_output(images, reference, client, tmp_path):
    """A worker kills itself (SIGKILL) after writing a mask folder's files, before the rename."""
    from distributed.diagnostics.plugin import WorkerPlugin

    from napari_sam.batch import run_batch

    marker = tmp_path / "killed"

    class KillOnceWhileWriting(WorkerPlugin):  # a local class: cloudpickle sends it by value
        name = "kill-once-while-writing"

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def setup(self, worker) -> None:
            import os
            import signal

            from napari_sam import cli as worker_cli

            original = worker_cli.write_masks_to_folder
            marker = self.marker

            def write_then_die(records, folder):
                original(records, folder)
                if "img3" in folder.name and not os.path.exists(marker):
                    with open(marker, "w") as file:
                        file.write(folder.name)
                    os.kill(os.getpid(), signal.SIGKILL)

            worker_cli.write_masks_to_folder = write_then_die

    client.register_plugin(KillOnceWhileWriting(str(marker)))
    try:
        model, settings = _model_and_settings()
        output = tmp_path / "out"
        result = run_batch(images, output, model=model, settings=settings, client=client, progress=False)
    finally:
        client.unregister_worker_plugin(KillOnceWhileWriting.name)
    assert marker.exists() and ".napari-sam-" in marker.read_text()  # it died inside the temporary folder
    assert (len(result.done), result.failed) == (N_IMAGES, {})
    assert _tree(output) == _tree(reference)
    assert _temporaries(output) == []
    client.wait_for_workers(2, timeout=60)


def test_thread_count_changes_floats_not_masks(images, reference, tmp_path):
    """What holds across torch thread counts (docs/batch.md): the masks; CSV floats may differ."""
    import torch

    output = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--input", str(images), "--output", str(output), "--threads", "2", *FLAGS]) == 0
    finally:
        torch.set_num_threads(threads)
    pngs = [name for name in _tree(reference) if name.endswith(".png")]
    match, mismatch, errors = filecmp.cmpfiles(reference, output, pngs, shallow=False)
    assert (mismatch, errors) == ([], [])
    assert os.path.exists(output / "img0" / "metadata.csv")


def test_cli_workers_starts_a_local_cluster(images, reference, tmp_path, capsys):
    """--workers 2 (with --memory-limit and --resources, which the local workers get) on two files."""
    folder = tmp_path / "screen"
    folder.mkdir()
    for name in ("img0.png", "img1.png"):
        (folder / name).write_bytes((images / name).read_bytes())
    output = tmp_path / "out"
    args = ["--input", str(folder), "--output", str(output), "--workers", "2", "--threads", "1",
            "--memory-limit", "2GiB", "--resources", "GPU=1", *FLAGS]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "local dask cluster of 2 worker(s) x 1 torch thread(s), 2.0 GiB each" in out
    assert "Done: 2 done" in out
    assert _tree(output) == {k: v for k, v in _tree(reference).items() if k.split("/")[0] in ("img0", "img1")}


def test_run_batch_without_client_runs_in_this_process(images, reference, tmp_path):
    import torch

    model, settings = _model_and_settings()
    folder = tmp_path / "screen"
    folder.mkdir()
    (folder / "img2.png").write_bytes((images / "img2.png").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    threads = torch.get_num_threads()
    try:
        from napari_sam.batch import run_batch

        result = run_batch([folder], tmp_path / "out", model=model, settings=settings, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert ([item.name for item in result.done], result.skipped, result.failed) == (["img2.png"], ["notes.txt"], {})
    assert _tree(tmp_path / "out") == {k: v for k, v in _tree(reference).items() if k.startswith("img2/")}
