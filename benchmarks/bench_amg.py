"""Automatic mask generation: napari-sam against the reference ``segment_anything``, one run.

Speed mode (default): both implementations load the same random vit_b weights and run
``generate`` on the same photo, alternating reference / ours fp32 / ours bf16, for the
default settings and for relaxed filters (pred_iou_thresh=0 (off), stability_score_thresh=0,
box_nms_thresh=1.0; with random weights almost nothing survives the defaults, so the
relaxed run times the whole post-processing). Prints the times, ours/reference ratios, a
record comparison (count, order, mask IoU) and each implementation's peak RSS, measured in a
fresh subprocess per implementation so one's allocations do not hide the other's.

Memory mode (``--memory``): ours only, a 4000x3000 image with crop_n_layers=1, default
settings, peak RSS of a fresh process, and the reference's estimated need.

Usage::

    PYTHONPATH=src python benchmarks/bench_amg.py                 # speed + RSS, vit_b, truck.jpg
    PYTHONPATH=src python benchmarks/bench_amg.py --memory        # 4000x3000, crop_n_layers=1
    PYTHONPATH=src python benchmarks/bench_amg.py --model vit_test --points-per-side 8   # smoke run

Needs ``segment_anything`` (the test oracle) for the reference runs; set the thread count with
``--threads`` (default: torch's). Timings are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "data" / "images"
# Relaxed filters keep every mask (3072 for a 32x32 grid): RLE output, since 3072 full-size
# boolean masks per run would need ~6.6 GB for a 2 MP photo in either implementation.
RELAXED = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, output_mode="uncompressed_rle")
SETTINGS = {"default": {}, "relaxed": RELAXED}


def load_image(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    image = Image.open(IMAGES / name).convert("RGB")
    if size is not None:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image)


def make_checkpoint(model: str, path: Path) -> Path:
    from _common import make_random_checkpoint  # the tests' random weights (decoder logits leave [-1, 1])

    return make_random_checkpoint(model, path)


def build(impl: str, model: str, checkpoint: Path):
    if impl == "ours":
        from napari_sam.build import sam_model_registry

        return sam_model_registry[model](checkpoint=checkpoint)
    from segment_anything.build_sam import _build_sam, sam_model_registry as ref_registry

    if model == "vit_test":
        return _build_sam(64, 2, 2, [1], checkpoint=str(checkpoint))
    return ref_registry[model](checkpoint=str(checkpoint))


def generator(impl: str, sam, precision: str, **kwargs):
    if impl == "ours":
        from napari_sam.automatic_mask_generator import SamAutomaticMaskGenerator

        return SamAutomaticMaskGenerator(sam, precision=precision, **kwargs)
    from segment_anything import SamAutomaticMaskGenerator as RefGenerator

    return RefGenerator(sam, **kwargs)


def peak_rss_mb() -> float:
    """This process's peak RSS in MB.

    VmHWM of /proc/self/status where available: ``ru_maxrss`` survives fork + exec on Linux,
    so a child would report its parent's peak when that is higher.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(ours: list[dict], ref: list[dict]) -> str:
    if len(ours) != len(ref):
        return f"DIFFERENT count {len(ours)} vs {len(ref)}"
    from napari_sam.utils.amg import rle_to_mask

    worst = 1.0
    same_meta = True
    for a, b in zip(ours, ref):
        ma, mb = a["segmentation"], b["segmentation"]
        if isinstance(ma, dict):
            ma, mb = rle_to_mask(ma), rle_to_mask(mb)
        union = np.logical_or(ma, mb).sum()
        worst = min(worst, np.logical_and(ma, mb).sum() / union if union else 1.0)
        same_meta &= a["point_coords"] == b["point_coords"] and a["bbox"] == b["bbox"]
    return f"{len(ref)} records, same order/points/boxes: {same_meta}, min mask IoU {worst:.5f}"


def worker(args: argparse.Namespace) -> None:
    """Child process: one implementation, one setting; prints JSON with time and peak RSS."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    image = load_image(args.image, tuple(args.size) if args.size else None)
    sam = build(args.worker, args.model, Path(args.checkpoint))
    kwargs = dict(SETTINGS[args.settings[0]], points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers)
    amg = generator(args.worker, sam, args.precision, **kwargs)
    start = time.perf_counter()
    records = amg.generate(image)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "records": len(records)}))


def run_child(args: argparse.Namespace, impl: str, settings: str, checkpoint: Path, extra: list[str]) -> dict:
    command = [
        sys.executable, __file__, "--worker", impl, "--settings", settings, "--checkpoint", str(checkpoint),
        "--model", args.model, "--image", args.image, "--points-per-side", str(args.points_per_side),
        "--crop-n-layers", str(args.crop_n_layers), "--precision", "fp32", *extra,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, checkpoint: Path) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    image = load_image(args.image)
    print(f"image {args.image} {image.shape[1]}x{image.shape[0]}, model {args.model}, "
          f"points_per_side {args.points_per_side}, threads {torch.get_num_threads()}")
    if args.settings:
        models = {"ours": build("ours", args.model, checkpoint), "ref": build("ref", args.model, checkpoint)}
        warm = load_image(args.image, (64, 48))
        for impl in ("ref", "ours"):  # warm-up: kernels, allocator
            generator(impl, models[impl], "fp32", points_per_side=2).generate(warm)
    runs = [("ref", "fp32"), ("ours", "fp32"), ("ours", "bf16")]
    for name in args.settings:
        kwargs = dict(SETTINGS[name], points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers)
        times = {run: [] for run in runs}
        counts = {}
        verdict = ""
        for _ in range(args.repeats):
            reference = None
            for impl, precision in runs:
                amg = generator(impl, models[impl], precision, **kwargs)
                start = time.perf_counter()
                records = amg.generate(image)
                times[(impl, precision)].append(time.perf_counter() - start)
                counts[(impl, precision)] = len(records)
                if impl == "ref":
                    reference = records
                elif precision == "fp32":
                    verdict = compare(records, reference)
                del amg, records  # keep at most two runs' records in memory
            del reference
        ref_time = statistics.median(times[("ref", "fp32")])
        print(f"\n[{name}] {kwargs}")
        for impl, precision in runs:
            t = statistics.median(times[(impl, precision)])
            print(f"  {impl:4s} {precision}: {t:8.2f} s  ratio {t / ref_time:.3f}  "
                  f"({counts[(impl, precision)]} masks)")
        print(f"  fp32 records vs reference: {verdict}")
    if args.rss:
        for name in args.rss:
            print(f"\npeak RSS, fresh process per implementation, [{name}] fp32:")
            for impl in ("ref", "ours"):
                child = run_child(args, impl, name, checkpoint, [])
                print(f"  {impl:4s}: {child['peak_rss_mb']:8.0f} MB  ({child['seconds']:.1f} s, {child['records']} masks)")


def memory(args: argparse.Namespace, checkpoint: Path) -> None:
    width, height = 4000, 3000
    print(f"4000x3000 ({args.image} resized), crop_n_layers=1, default settings, model {args.model}, ours only")
    args.crop_n_layers = 1
    child = run_child(args, "ours", "default", checkpoint, ["--size", str(width), str(height)])
    print(f"  ours: peak RSS {child['peak_rss_mb']:.0f} MB, {child['seconds']:.1f} s, {child['records']} masks")
    per_batch = 3 * 64 * height * width * 4
    print(f"  reference (estimate, not run): full-resolution logits of 3x64 masks per batch on the whole-image "
          f"crop = {per_batch / 2**30:.1f} GiB, plus 3x64 1024x1024 intermediates "
          f"({3 * 64 * 1024 * 1024 * 4 / 2**30:.2f} GiB) and their boolean masks "
          f"({3 * 64 * height * width / 2**30:.1f} GiB) before any filtering")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--image", default="truck.jpg")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--settings", nargs="*", default=["default", "relaxed"], choices=sorted(SETTINGS),
                        help="settings timed in this process (none: only the RSS children)")
    parser.add_argument("--rss", nargs="*", default=["relaxed"], choices=sorted(SETTINGS),
                        help="settings whose peak RSS is measured in fresh processes (none: skip)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--memory", action="store_true", help="4000x3000 crop_n_layers=1 memory check (ours)")
    parser.add_argument("--checkpoint", default=None, help="reuse a checkpoint instead of making random weights")
    # internal: child process
    parser.add_argument("--worker", choices=("ours", "ref"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.model, Path(folder) / "w.pth")
        (memory if args.memory else speed)(args, checkpoint)


if __name__ == "__main__":
    main()
