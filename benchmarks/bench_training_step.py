"""Time one training step of the bundled small model, eager against ``torch.compile`` (issue 7).

The step of ``scripts/train_small_model.py``'s phases 1-3: ``vit_small`` from the shipped
weights, 4 synthetic images per step, 10 objects per image, 2 prompt rounds, bf16
autocast, AdamW. Both variants run in one process on the same batches and prompts, after
the compiled one has compiled its kernels (the first steps; their time is printed apart).
Steps alternate (eager, compiled) so that both see the same machine load; the medians are
compared. Each variant has its own model copy and optimizer, so both train as they would
in a run.

    python benchmarks/bench_training_step.py [--steps 12] [--threads 2]

Prints the compile time, the median seconds per step of each variant and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_sam.checkpoints import build_sam
from napari_sam.training.trainer import StepFunctions, SyntheticData, TrainConfig, optimization_step

WARMUP_STEPS = 6  # compiled steps before timing: point and box prompts, 1 to 3 points


def run_step(model, optimizer, functions: StepFunctions, data: SyntheticData, config: TrainConfig, step: int) -> float:
    """One optimizer step on batch ``step`` (as ``train`` runs it); returns its wall-clock seconds."""
    started = time.perf_counter()
    optimization_step(model, optimizer, data, config, step, functions)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (default 12)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(images_per_step=4, objects_per_image=10, iterations=2, precision="bf16", lr=1e-5)
    data = SyntheticData(seed=7, kind_weights={"shapes": 2.0, "nuclei": 1.0, "cells": 1.0})
    variants = {}
    for name in ("eager", "compiled"):
        model = build_sam("vit_small", device="cpu").train()
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5),
                          StepFunctions.for_model(model, compiled=name == "compiled"))
    started = time.perf_counter()
    for step in range(WARMUP_STEPS):
        run_step(*variants["compiled"], data, config, step)
    print(f"compiled: first {WARMUP_STEPS} steps (compiling included) {time.perf_counter() - started:.0f} s")
    run_step(*variants["eager"], data, config, 0)
    seconds = {name: [] for name in variants}
    for step in range(WARMUP_STEPS, WARMUP_STEPS + args.steps):
        for name in variants:
            seconds[name].append(run_step(*variants[name], data, config, step))
    eager, compiled = (float(np.median(seconds[n])) for n in ("eager", "compiled"))
    print(f"{args.steps} steps each, {args.threads} threads: eager {eager:.2f} s/step, compiled {compiled:.2f} s/step, "
          f"compiled/eager {compiled / eager:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
