"""Time the small model's training step: 1 process of N threads against N processes of 1 thread (issue 7).

The step of ``experiments/train_small_model.py``'s phases 1-3 (``vit_small`` from the shipped
weights, 4 synthetic images per step, 10 objects per image, 2 prompt rounds, bf16
autocast, AdamW), run by :func:`napari_sam.training.trainer.train` with
``TrainConfig.processes`` = 1 and = N (data parallel, :mod:`napari_sam.training.parallel`),
each eager and with ``torch_compile``. Every variant trains ``--warmup`` + ``--steps``
steps in a fresh run folder; the median wall-clock time of the last ``--steps`` is
compared with that of the eager 1-process run. The variants run one after the other in
this process (the data-parallel ones start their other processes), so run it on an
otherwise idle machine.

    python experiments/bench_data_parallel.py [--steps 20] [--warmup 6] [--threads 2] [--no-compile]

Prints, per variant, the median seconds per step and the ratio to the eager 1-process
run, then the steps per hour that each variant gives.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_sam.checkpoints import build_sam
from napari_sam.training.trainer import SyntheticData, TrainConfig, train


def seconds_per_step(config: TrainConfig, warmup: int, out: Path) -> float:
    """Median wall-clock seconds of the steps after the first ``warmup`` of a fresh run."""
    stamps = [time.perf_counter()]
    data = SyntheticData(seed=7, kind_weights={"shapes": 2.0, "nuclei": 1.0, "cells": 1.0})
    train(build_sam("vit_small", device="cpu"), data, config, out, log_every=1000,
          progress=lambda done, total, result: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps)[warmup:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=6, help="untimed first steps (compiling; default 6)")
    parser.add_argument("--threads", type=int, default=2, help="cores to use: threads of the 1-process run and "
                        "processes of the data-parallel one (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="time the eager variants only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = TrainConfig(steps=args.warmup + args.steps, images_per_step=4, objects_per_image=10, iterations=2,
                       precision="bf16", lr=1e-5, warmup_steps=1, checkpoint_every=10_000)
    variants = [(f"1 process x {args.threads} threads", 1, False),
                (f"{args.threads} processes x 1 thread", args.threads, False)]
    if not args.no_compile:
        variants += [(name + ", compiled", processes, True) for name, processes, _ in variants]
    timings = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, processes, compiled) in enumerate(variants):
            config = TrainConfig(**{**base.__dict__, "processes": processes, "torch_compile": compiled})
            timings[name] = seconds_per_step(config, args.warmup, Path(folder) / str(index))
            print(f"{name}: {timings[name]:.2f} s/step", flush=True)
    reference = timings[variants[0][0]]
    print(f"\n{args.steps} timed steps each after {args.warmup}; ratio to {variants[0][0]} (eager):")
    for name, seconds in timings.items():
        print(f"  {name:<40} {seconds:5.2f} s/step  {seconds / reference:4.2f}  {3600 / seconds:5.0f} steps/hour")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
