"""A first click on a 10000 x 10000 RGB image: peak memory and time, computed and read from a store.

For each model (vit_b with random weights: the speed and memory of the real one; the bundled
vit_small), in fresh processes so that memory figures are the click's own:

1. **compute**: a :class:`napari_sam.TiledPredictor` (default tile shape: the model's input
   size, halo an eighth) with an empty zarr embedding store opened as the plugin opens it
   (``write_behind=True``: the tile's embedding is written in the background, after the
   click, which does not wait for the disk); ``set_image`` then one positive
   point on a small object (``predict(..., return_crop=True)``: the tile's masks and their
   offset, the output for large images, which the plugin uses too; the best mask taken): the
   first click embeds one tile (lazily) and predicts (after a
   warm-up click on a small unrelated image, so that torch's and Python's first-call costs
   are not counted as the large image's; the store is new, so its creation is counted). Printed: the
   peak resident memory (RSS) of the process during the click (the kernel's high-water mark
   reset just before it, ``/proc/self/clear_refs``), the click's time, and the time of one
   tile embedding (``SamPredictor.set_image`` on one tile-sized crop, measured in the same
   process after the click), their ratio (goal <= 1.3), and the tiles embedded (goal: 1).
2. **store**: a new process opens the store written by (1) and clicks the same point: the tile's
   embedding is read back; its time as a fraction of the compute click (goal <= 0.1) and its
   peak RSS; the masks are checked equal to those of (1).

Goals (issue 27): peak RSS < 3 GB with vit_b, < 1.5 GB with vit_small.

The image: a uniform grey-blue background with mild noise and thousands of small bright
discs (radius 6-12 px), like nuclei on a slide scan; made once as a ``.npy`` file that each
process loads whole into memory (as a napari Image layer holds it: its 0.28 GiB count in
the peak RSS).

Each model runs ``--repeats`` rounds (default 3; fresh processes, a new store each) and the
medians are printed with every round's ratios.

    .venv/bin/python benchmarks/bench_large_image.py [--size 10000] [--models vit_b vit_small] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_image(path: Path, size: int, seed: int = 0) -> tuple[int, int]:
    """Write the synthetic RGB image to ``path`` (.npy) and return the (x, y) of one object's centre."""
    rng = np.random.default_rng(seed)
    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    rows = 1000
    for y0 in range(0, size, rows):  # in bands: the whole image never needs float memory
        band = rng.normal(0, 6, size=(min(rows, size - y0), size, 1)).astype(np.float32)
        band = band + np.array([40, 45, 70], dtype=np.float32)
        image[y0:y0 + len(band)] = np.clip(band, 0, 255).astype(np.uint8)
    count = size * size // 20000  # 5000 discs on 10000 x 10000
    centres = rng.uniform(20, size - 20, size=(count, 2))
    radii = rng.uniform(6, 12, size=count)
    colours = rng.uniform(150, 255, size=(count, 3))
    yy, xx = np.mgrid[-13:14, -13:14]
    for (cy, cx), radius, colour in zip(centres, radii, colours):
        y, x = int(cy), int(cx)
        disc = (yy ** 2 + xx ** 2) <= radius ** 2
        patch = image[y - 13:y + 14, x - 13:x + 14]
        patch[disc] = colour.astype(np.uint8)
    image.flush()
    y, x = (int(v) for v in centres[0])
    return x, y


def read_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def click(args: argparse.Namespace) -> dict:
    """One scenario in this process (called in a child): returns the figures."""
    import torch

    torch.set_num_threads(args.threads)
    from napari_sam import EmbeddingStore, SamPredictor, TiledPredictor
    from napari_sam.models.registry import build_model

    model = build_model(args.model, args.checkpoint) if args.checkpoint else build_model(args.model, None)
    if args.model == "vit_small":
        from napari_sam import build_sam

        model = build_sam("vit_small")
    image = np.load(args.image)
    x, y = args.point
    store = EmbeddingStore(args.store, model, model_type=args.model,  # opened as the plugin opens it
                           tile_shape=model.image_encoder.img_size,
                           halo=model.image_encoder.img_size // 8, write_behind=True)
    predictor = TiledPredictor(model, store=store)
    torch.set_grad_enabled(False)
    # Warm-up: one click on a small unrelated image (torch's and Python's first-call costs are not
    # the large image's; after any earlier click they are paid).
    warm = TiledPredictor(model)
    warm.set_image(np.full((64, 64, 3), 90, dtype=np.uint8))
    warm.predict(np.array([[32, 32]]), np.array([1]), return_crop=True)
    del warm
    baseline = read_kib("VmRSS")
    reset = reset_peak_rss()
    point, label = np.array([[x, y]]), np.array([1])
    start = time.perf_counter()
    # The click: set the image, predict with the crop output (the tile's masks and their offset,
    # the option for large images; the plugin's engine uses it too) and take the best mask.
    predictor.set_image(image)
    crops, scores, _, (y0, x0) = predictor.predict(point, label, return_crop=True)
    crop = crops[int(np.argmax(scores))]
    elapsed = time.perf_counter() - start
    # What the plugin adds: the best mask placed into one H x W mask for the Labels layer.
    begin = time.perf_counter()
    best = np.zeros(image.shape[:2], dtype=bool)
    best[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    placed = time.perf_counter() - begin
    store.flush()  # the tile's write, in the background meanwhile, is on disk
    peak = read_kib("VmHWM")
    # The same click through the full-frame API (3 x H x W masks), now that the tile is embedded,
    # against the crop API: what full-frame output adds.
    begin = time.perf_counter()
    predictor.predict(point, label, return_crop=True)
    crop_only = time.perf_counter() - begin
    begin = time.perf_counter()
    predictor.predict(point, label)
    full_frame_extra = time.perf_counter() - begin - crop_only
    ys, xs = np.nonzero(best[max(0, y - 600):y + 600, max(0, x - 600):x + 600])
    figures = {
        "model": args.model, "mode": args.mode, "click_s": elapsed, "peak_rss_gib": peak / 2**20,
        "rss_before_gib": baseline / 2**20, "peak_reset": reset,
        "tiles_embedded": len(predictor.embeddings.computed), "tiles_loaded": len(predictor.embeddings.loaded),
        "mask_area_near_click": int(len(xs)), "full_frame_extra_s": full_frame_extra, "placed_s": placed,
    }
    np.save(args.masks, best[max(0, y - 64):y + 64, max(0, x - 64):x + 64])
    if args.mode == "compute":
        tile = predictor.grid.tile_at(y, x)
        crop = np.ascontiguousarray(image[tile.crop_slices])
        single = SamPredictor(model)
        times = []
        for _ in range(2):
            begin = time.perf_counter()
            single.set_image(crop)
            times.append(time.perf_counter() - begin)
        figures["one_tile_embedding_s"] = min(times)
    return figures


def run_child(script_args: list[str]) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", *script_args], check=True,
                            capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10000)
    parser.add_argument("--models", nargs="+", default=["vit_b", "vit_small"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per model (medians are printed)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    parser.add_argument("--point", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(click(args)))
        return 0

    sys.path.insert(0, str(HERE))
    from _common import make_random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-large-"))
    image_path = work / "image.npy"
    start = time.perf_counter()
    x, y = make_image(image_path, args.size)
    print(f"image {args.size} x {args.size} x 3 uint8 ({args.size ** 2 * 3 / 2**30:.2f} GiB) made in "
          f"{time.perf_counter() - start:.0f} s; click at (x, y) = ({x}, {y}); torch threads {args.threads}; "
          f"cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}")
    results = []
    for model_type in args.models:
        checkpoint = []
        if model_type != "vit_small":
            path = work / f"{model_type}.pth"
            make_random_checkpoint(model_type, path)
            checkpoint = ["--checkpoint", str(path)]
        rounds = []
        for repeat in range(args.repeats):  # fresh processes and a new store each round
            store = work / f"{model_type}-{repeat}.zarr"
            common = ["--model", model_type, "--image", str(image_path), "--store", str(store),
                      "--point", str(x), str(y), "--threads", str(args.threads), *checkpoint]
            computed = run_child([*common, "--mode", "compute", "--masks", str(work / "a.npy")])
            stored = run_child([*common, "--mode", "store", "--masks", str(work / "b.npy")])
            same = bool(np.array_equal(np.load(work / "a.npy"), np.load(work / "b.npy")))
            rounds.append({"computed": computed, "stored": stored, "same_masks": same,
                           "ratio": computed["click_s"] / computed["one_tile_embedding_s"],
                           "store_ratio": stored["click_s"] / computed["click_s"]})

        def median(key, part=None):
            return statistics.median(r[key] if part is None else r[part][key] for r in rounds)

        computed, stored = rounds[0]["computed"], rounds[0]["stored"]
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
        store_ratios = ", ".join(f"{r['store_ratio']:.3f}" for r in rounds)
        goal = 3.0 if model_type != "vit_small" else 1.5
        print(f"{model_type} (median of {args.repeats} rounds): first click {median('click_s', 'computed'):.3f} s, "
              f"one tile embedding {median('one_tile_embedding_s', 'computed'):.3f} s: ratio {median('ratio'):.2f} "
              f"(goal <= 1.3; rounds {ratios}); tiles embedded "
              f"{computed['tiles_embedded']}; peak RSS {median('peak_rss_gib', 'computed'):.2f} GiB (goal < {goal} GB; "
              f"{computed['rss_before_gib']:.2f} GiB before the click); placing the mask into an H x W mask (the "
              f"plugin) adds {median('placed_s', 'computed') * 1000:.0f} ms, the full-frame API's 3 x H x W masks "
              f"{median('full_frame_extra_s', 'computed') * 1000:.0f} ms")
        print(f"{model_type} from the store: click {median('click_s', 'stored'):.3f} s = {median('store_ratio'):.3f} x "
              f"the computed click (goal <= 0.1; rounds {store_ratios}); "
              f"tiles read {stored['tiles_loaded']}, embedded {stored['tiles_embedded']}; peak RSS "
              f"{median('peak_rss_gib', 'stored'):.2f} GiB; masks equal to the computed click: "
              f"{all(r['same_masks'] for r in rounds)}")
        results.append({"model": model_type, "rounds": rounds, "ratio": median("ratio"),
                        "store_ratio": median("store_ratio")})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
