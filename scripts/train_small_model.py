"""Train the small SAM shipped in the package (model type ``vit_small``) from scratch.

Synthetic data only (``napari_sam.training.synthetic``), fixed seeds, 2 CPU threads; about
75-90 minutes on a 2-core machine. Resumable: run the same command again after an
interruption. When done, the weights are copied to ``src/napari_sam/weights/`` (the file
the package loads offline) unless ``--no-install`` is given.

    python scripts/train_small_model.py [--out runs/vit_small] [--steps 1500]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from napari_sam.build import MODEL_CONFIGS, build_sam_from_config
from napari_sam.checkpoints import SMALL_MODEL_FILE
from napari_sam.training.trainer import SyntheticData, TrainConfig, init_from_scratch, train

RECIPE = TrainConfig(
    steps=1600, images_per_step=4, objects_per_image=10, iterations=2, lr=6e-4, weight_decay=0.05,
    warmup_steps=50, precision="bf16", seed=0, checkpoint_every=25,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/vit_small", help="run folder (checkpoints, history)")
    parser.add_argument("--steps", type=int, default=RECIPE.steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-install", action="store_true", help="do not copy the result into the package")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    config = TrainConfig(**{**RECIPE.__dict__, "steps": args.steps})
    model = init_from_scratch(build_sam_from_config(MODEL_CONFIGS["vit_small"]), seed=config.seed)
    started = time.perf_counter()
    train(model, SyntheticData(seed=config.seed), config, args.out, log_every=10)
    print(f"trained {config.steps} steps in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if not args.no_install:
        SMALL_MODEL_FILE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.out) / "model.pth", SMALL_MODEL_FILE)
        print(f"installed {SMALL_MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
