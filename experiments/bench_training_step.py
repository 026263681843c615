"""Time one training step of the bundled small model: eager against ``torch.compile``, or
bf16 autocast against fp32 (issue 7).

The step of ``experiments/train_small_model.py``'s phases 1-3: ``vit_small`` from the shipped
weights, 4 synthetic images per step, 10 objects per image, 2 prompt rounds, AdamW.

* ``--compare compile`` (default): eager against compiled, both with bf16 autocast, in one
  process on the same batches and prompts, after the compiled one has compiled its
  kernels (the first steps; their time is printed apart).
* ``--compare precision``: eager steps with bf16 autocast (the recipe's setting) against
  eager fp32 steps. The recipe chose bf16 when it was the faster one; with torch 2.14.1
  bf16 matrix products are slower than fp32 ones on the 2-core machine
  (``bench_bf16_gemm.py``).

Steps alternate between the two variants so that both see the same machine load; the
medians are compared. Each variant has its own model copy and optimizer, so both train as
they would in a run.

    python experiments/bench_training_step.py [--compare compile|precision] [--steps 12] [--threads 2]

Prints the median seconds per step of each variant and their ratio (second / first).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from napari_sam.checkpoints import build_sam
from napari_sam.training.trainer import StepFunctions, SyntheticData, TrainConfig, optimization_step

WARMUP_STEPS = 6  # compiled steps before timing: point and box prompts, 1 to 3 points


@dataclass
class Variant:
    """One timed set-up: its own model copy, optimizer, step functions and config."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    functions: StepFunctions
    config: TrainConfig

    def step(self, data: SyntheticData, step: int) -> float:
        """One optimizer step on batch ``step`` (as ``train`` runs it); returns its wall-clock seconds."""
        started = time.perf_counter()
        optimization_step(self.model, self.optimizer, data, self.config, step, self.functions)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("compile", "precision"), default="compile",
                        help="eager against compiled (bf16), or bf16 against fp32 (eager); default compile")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (default 12)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = SyntheticData(seed=7, kind_weights={"shapes": 2.0, "nuclei": 1.0, "cells": 1.0})
    # name -> (precision, compiled)
    settings = ({"eager": ("bf16", False), "compiled": ("bf16", True)} if args.compare == "compile"
                else {"bf16": ("bf16", False), "fp32": ("fp32", False)})
    variants = {}
    for name, (precision, compiled) in settings.items():
        model = build_sam("vit_small", device="cpu").train()
        config = TrainConfig(images_per_step=4, objects_per_image=10, iterations=2, precision=precision, lr=1e-5)
        variants[name] = Variant(model, torch.optim.AdamW(model.parameters(), lr=1e-5),
                                 StepFunctions.for_model(model, compiled=compiled), config)
    if args.compare == "compile":
        started = time.perf_counter()
        for step in range(WARMUP_STEPS):
            variants["compiled"].step(data, step)
        print(f"compiled: first {WARMUP_STEPS} steps (compiling included) {time.perf_counter() - started:.0f} s")
    first, second = variants
    for variant in variants.values():  # one untimed step each (first-call allocations)
        variant.step(data, 0)
    seconds = {name: [] for name in variants}
    for step in range(WARMUP_STEPS, WARMUP_STEPS + args.steps):
        for name, variant in variants.items():
            seconds[name].append(variant.step(data, step))
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    print(f"{args.steps} steps each, {args.threads} threads: {first} {medians[first]:.2f} s/step, "
          f"{second} {medians[second]:.2f} s/step, {second}/{first} {medians[second] / medians[first]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
