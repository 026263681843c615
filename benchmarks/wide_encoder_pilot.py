"""Pilot of a larger image encoder for ``vit_small`` (not shipped): does it learn more per step?

``vit_small`` with a 256-wide, 8-block encoder (8 heads, global attention in blocks 3 and
7) instead of 192 wide and 6 blocks; the decoder and everything else as shipped. It is
trained with ``scripts/train_small_model.py`` (any of its options) and scored with
``benchmarks/eval_small_model.py``, both run with this encoder in place of the shipped one
(``MODEL_CONFIGS["vit_small"]`` for training; an extra model type ``vit_small_wide`` for
the evaluation, so that the checkpoint's type is detected from its tensor shapes):

    python benchmarks/wide_encoder_pilot.py train --scale 0.25 --until phase3 --no-install --out runs/wide
    python benchmarks/wide_encoder_pilot.py eval --validation --amg-images 0 --checkpoint runs/wide/phase3/model.pth

At x0.25 of the recipe's steps a step takes about 2.8 s (2.2 s for the shipped size) and
the scores on the second held-out set are those of the README's "Where the limit is".
"""

from __future__ import annotations

import dataclasses
import runpy
import sys
from pathlib import Path

import napari_sam.build as build

WIDE_ENCODER = dataclasses.replace(
    build.MODEL_CONFIGS["vit_small"], embed_dim=256, depth=8, num_heads=8, global_attn_indexes=(3, 7)
)
ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("train", "eval"):
        raise SystemExit("usage: wide_encoder_pilot.py train|eval [options of train_small_model.py / eval_small_model.py]")
    if argv[0] == "train":
        if "--no-install" not in argv:
            raise SystemExit("the pilot never replaces the shipped weights: add --no-install")
        build.MODEL_CONFIGS["vit_small"] = WIDE_ENCODER
        script = ROOT / "scripts" / "train_small_model.py"
    else:
        build.MODEL_CONFIGS["vit_small_wide"] = WIDE_ENCODER
        script = ROOT / "benchmarks" / "eval_small_model.py"
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
