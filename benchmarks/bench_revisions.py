"""napari-sam at two revisions, on this machine, in one run: is a change a speed or memory regression?

The ratios against the reference (``bench_predictor.py``, ``bench_amg.py``) depend on the
machine (a CPU without AVX-512 makes bf16 several times slower, for instance), so figures from
another machine cannot tell whether a change regressed. This script times the same work with
the package's ``src`` folder of two revisions: each measurement runs in a fresh process
(``PYTHONPATH`` set to one revision's ``src``), the revisions alternate, and the same random
vit_b weights and photo are used. It prints each revision's medians, the ratio new / base and
each AMG process's peak RSS.

    git worktree add /tmp/base <revision>
    python benchmarks/bench_revisions.py --base /tmp/base/src [--new src] [--rounds 2] [--bf16]

Work measured: ``SamPredictor.set_image`` (fp32; bf16 with ``--bf16``), ``predict`` on the
parity prompts, and ``SamAutomaticMaskGenerator.generate`` with the reference's defaults.
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

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("predictor", "amg")


def worker(task: str, checkpoint: str, image_name: str, precision: str) -> dict:
    """Runs in a fresh process whose ``napari_sam`` is one revision's; returns seconds and peak RSS."""
    import numpy as np
    import torch

    from _common import load_rgb
    from bench_amg import peak_rss_mb
    from bench_predictor import parity_prompts
    from napari_sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

    image = load_rgb(image_name)
    sam = sam_model_registry["vit_b"](checkpoint=checkpoint)
    out: dict = {"torch": torch.__version__}
    if task == "predictor":
        predictor = SamPredictor(sam, precision=precision)
        predictor.set_image(image)  # warm-up
        start = time.perf_counter()
        predictor.set_image(image)
        out["set_image_s"] = time.perf_counter() - start
        prompts = parity_prompts(*image.shape[:2])
        times = []
        for _ in range(5):
            for prompt in prompts:
                start = time.perf_counter()
                predictor.predict(**prompt)
                times.append(time.perf_counter() - start)
        out["predict_s"] = statistics.median(times)
        out["features"] = float(np.asarray(predictor.features.float().abs().mean()))
    else:
        generator = SamAutomaticMaskGenerator(sam)
        start = time.perf_counter()
        records = generator.generate(image)
        out["amg_s"] = time.perf_counter() - start
        out["masks"] = len(records)
        out["amg_peak_rss_mb"] = peak_rss_mb()
    return out


def run(src: Path, task: str, checkpoint: Path, image: str, precision: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(ROOT / "benchmarks")]))
    command = [sys.executable, __file__, "--worker", task, "--checkpoint", str(checkpoint), "--image", image,
               "--precision", precision]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="the base revision's src folder")
    parser.add_argument("--new", type=Path, default=ROOT / "src", help="the new revision's src folder")
    parser.add_argument("--image", default="truck.jpg")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per revision and task")
    parser.add_argument("--bf16", action="store_true", help="also time set_image in bf16 (slow without AVX-512 bf16)")
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.image, args.precision)))
        return
    if args.base is None:
        parser.error("--base is required")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import make_random_checkpoint

    revisions = {"base": args.base.resolve(), "new": args.new.resolve()}
    jobs = [("predictor", "fp32"), ("amg", "fp32")] + ([("predictor", "bf16")] if args.bf16 else [])
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = make_random_checkpoint("vit_b", Path(folder) / "random_vit_b.pth")
        results: dict = {}
        for task, precision in jobs:
            rounds = 1 if precision == "bf16" else args.rounds
            for _ in range(rounds):
                for name, src in revisions.items():
                    measured = run(src, task, checkpoint, args.image, precision)
                    for key, value in measured.items():
                        results.setdefault((task, precision, key), {}).setdefault(name, []).append(value)
    print(f"vit_b, {args.image}, base {revisions['base']}, new {revisions['new']}")
    print(f"{'measure':<34}{'base':>12}{'new':>12}{'new / base':>12}")
    for (task, precision, key), values in results.items():
        if key == "torch":
            continue
        base, new = statistics.median(values["base"]), statistics.median(values["new"])
        ratio = new / base if base else float("nan")
        print(f"{f'{task} {precision} {key}':<34}{base:>12.4g}{new:>12.4g}{ratio:>12.3f}")


if __name__ == "__main__":
    main()
