"""Throughput of batch AMG on dask.distributed against one process (napari_sam.batch).

One folder of crops of the test photos, the bundled vit_small, fp32 on the CPU. Timed:

* one process: the CLI's per-file path (:func:`napari_sam.cli.process_job`) in a loop, one torch thread;
* a LocalCluster (:func:`napari_sam.batch.start_local_cluster`, as ``--workers N``) of 1 worker x 1
  thread, then 2 workers x 1 thread: :func:`napari_sam.batch.run_jobs`
  with the model already loaded on the workers (start-up and model loading are printed apart).

Printed: images/s of each, the speed-up of 2 workers over 1 (goal on 2 cores: >= 1.6x) and the
per-image overhead of the distributed path over one process (goal <= 10%): every image is
segmented once in this process and once as its own task on the 1-worker cluster, alternating
which goes first, so that drifting load on the machine cancels (the one-process loop timed
before and after the clusters is printed too, but drifts between phases). Every run writes into a fresh folder; outputs are checked
byte-identical to the one-process run. Other load on the machine shows in the figures: run on
an otherwise idle machine. The load average and the parallel capacity (how many cores two
CPU-bound processes get, before and after) are printed so that a speed-up can be judged.

    python benchmarks/bench_distributed.py [--images 16] [--size 256] [--points-per-side 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"


def make_images(folder: Path, count: int, size: int) -> None:
    from PIL import Image

    sources = [Image.open(IMAGES / name).convert("RGB") for name in ("truck.jpg", "groceries.jpg")]
    for i in range(count):
        image = sources[i % 2]
        x, y = (i * 97) % (image.width - size), (i * 53) % (image.height - size)
        image.crop((x, y, x + size, y + size)).save(folder / f"img{i:03d}.png")


def _spin(n: int = 5_000_000) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - start


def parallel_capacity() -> float:
    """How many cores two CPU-bound processes really get now (2.0 on an idle 2-core machine): the
    time of one pure-Python loop over the mean time of two run at once in separate processes."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_spin, [100, 100]))  # start both processes
        alone = pool.submit(_spin).result()
        together = list(pool.map(_spin, [5_000_000, 5_000_000]))
    return 2 * alone / max(together)


def interleaved_overhead(client, generator, model, settings, plan, reference) -> dict:
    """Per-image overhead of the distributed path, with drift cancelled: every image is segmented
    once in this process and once as its own dask task on the 1-worker cluster (submitted, result
    awaited: no pipelining, so the scheduler's round trip is counted in full), alternating which
    goes first; the two sums of wall times are compared."""
    from napari_sam import cli
    from napari_sam.batch import run_item

    local_jobs, local_output = plan("interleaved-one-process")
    remote_jobs, remote_output = plan("interleaved-cluster")
    local = remote = 0.0
    for index, (job, remote_job) in enumerate(zip(local_jobs, remote_jobs)):
        for side in ((0, 1) if index % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            if side == 0:
                cli.process_job(job, generator, None, "overwrite", progress=False, log=lambda line: None)
                local += time.perf_counter() - start
            else:
                item = client.submit(run_item, remote_job, model, settings, None, "overwrite", pure=False).result()
                assert item.status == "done", item
                remote += time.perf_counter() - start
    assert tree(local_output) == reference and tree(remote_output) == reference
    return {"interleaved_local_s": local, "interleaved_cluster_s": remote, "interleaved_overhead": remote / local - 1}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from napari_sam import cli
    from napari_sam.amg_settings import AmgSettings
    from napari_sam.batch import ModelChoice, SamWorkerPlugin, run_jobs, start_local_cluster

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    inputs = work / "in"
    inputs.mkdir()
    make_images(inputs, args.images, args.size)
    model_type, checkpoint = cli.resolve_checkpoint("vit_small", None)
    settings = AmgSettings.for_model(model_type, output_mode="binary_mask", points_per_side=args.points_per_side,
                                     pred_iou_thresh=0.3, stability_score_thresh=0.3)
    model = ModelChoice(model_type, checkpoint, "fp32", "cpu", threads=1)

    def plan(name: str):
        output = work / name
        jobs, failed, _ = cli.plan_jobs(cli.list_targets(inputs), output, None)
        assert not failed
        cli.prepare_output_folder(output)
        return jobs, output

    print(f"{args.images} images of {args.size} x {args.size}, vit_small fp32 cpu, points per side "
          f"{args.points_per_side}; cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}")
    capacity = parallel_capacity()
    print(f"parallel capacity now (2 spinning processes): {capacity:.2f} of 2 cores")
    generator = cli.load_generator(model_type, checkpoint, "cpu", settings, "fp32")
    jobs, output = plan("warm-up")
    cli.process_job(jobs[0], generator, None, "overwrite", progress=False, log=lambda line: None)
    jobs, output = plan("one-process")
    start = time.perf_counter()
    for job in jobs:
        cli.process_job(job, generator, None, "overwrite", progress=False, log=lambda line: None)
    single = time.perf_counter() - start
    reference = tree(output)
    figures = {"parallel_capacity": capacity, "images": args.images, "size": args.size, "points_per_side": args.points_per_side,
               "one_process_s": single, "one_process_images_per_s": args.images / single}
    print(f"one process, 1 thread:      {args.images / single:6.2f} images/s ({single / args.images * 1000:.0f} ms/image)")

    for workers in (1, 2):
        start = time.perf_counter()
        client, _ = start_local_cluster(workers, threads=1)  # napari-sam-amg --workers N --threads 1
        with client, client.cluster:
            client.register_plugin(SamWorkerPlugin(model, settings))  # every worker loads the model now
            ready = time.perf_counter() - start
            warm_jobs, _ = plan(f"warm-up-{workers}")
            run_jobs(warm_jobs[: 2 * workers], model, settings, None, "overwrite", client, progress=False)
            jobs, output = plan(f"cluster-{workers}")
            start = time.perf_counter()
            result = run_jobs(jobs, model, settings, None, "overwrite", client, progress=False)
            elapsed = time.perf_counter() - start
            if workers == 1:
                figures.update(interleaved_overhead(client, generator, model, settings, plan, reference))
        assert not result.failed and len(result.done) == args.images, result.summary()
        assert tree(output) == reference, "outputs differ from the one-process run"
        figures[f"workers_{workers}_s"] = elapsed
        figures[f"workers_{workers}_images_per_s"] = args.images / elapsed
        figures[f"workers_{workers}_startup_s"] = ready
        print(f"{workers} worker(s) x 1 thread:    {args.images / elapsed:6.2f} images/s "
              f"({elapsed / args.images * 1000:.0f} ms/image; cluster start + model load {ready:.1f} s)")
    jobs, output = plan("one-process-again")  # once more after the clusters: other load drifts
    start = time.perf_counter()
    for job in jobs:
        cli.process_job(job, generator, None, "overwrite", progress=False, log=lambda line: None)
    again = time.perf_counter() - start
    assert tree(output) == reference
    figures["one_process_again_s"] = again
    print(f"one process again:          {args.images / again:6.2f} images/s ({again / args.images * 1000:.0f} ms/image)")
    speedup = figures["workers_1_s"] / figures["workers_2_s"]
    overhead = figures["workers_1_s"] / ((single + again) / 2) - 1
    figures.update(speedup_2_over_1=speedup, overhead_1_worker=overhead)
    print(f"speed-up 2 workers / 1 worker: {speedup:.2f}x (goal >= 1.6x on 2 idle cores; "
          f"capacity after the run: {parallel_capacity():.2f})")
    print(f"per-image time, 1 worker against one process, in separate phases (mean of before and after; "
          f"drifts with other load): {overhead * 100:+.1f}%")
    print(f"per-image overhead, 1 worker x 1 thread against one process x 1 thread, interleaved image by image: "
          f"{figures['interleaved_overhead'] * 100:+.1f}% (goal <= 10%; {figures['interleaved_local_s']:.1f} s in "
          f"one process, {figures['interleaved_cluster_s']:.1f} s through dask, {args.images} images each)")
    print("outputs byte-identical to the one-process run: yes")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
