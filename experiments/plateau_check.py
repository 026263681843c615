"""How long the mask decoder of a from-scratch ``vit_small`` stays on the all-background
plateau, with SAM's initialisation and with tied cross-attention
(``init_from_scratch(..., tie_cross_attention=True)``).

Each variant runs the first ``--steps`` steps of phase 1 of ``experiments/train_small_model.py``
(same data, prompts, learning-rate schedule and seed), then stops. It prints the mean
last-round IoU per 50 steps and the first logged step whose IoU reaches 0.1. Runs are
resumable (``<out>/<variant>``), and a variant that already logged ``--steps`` steps is
not trained again.

    python experiments/plateau_check.py [--steps 400] [--variants default tied] [--out runs/plateau]

About 15 min per variant on 2 CPU threads. The "tied" variant repeats the start of the
shipped recipe's phase 1 (``experiments/train_small_model.py``) and the "default" variant that
of ``experiments/train_small_model.py --untied``, so their figures can be compared with the
``phase1/history.jsonl`` of those full runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from napari_sam.build import MODEL_CONFIGS, build_sam_from_config
from napari_sam.training.trainer import init_from_scratch, train

# sibling scripts in experiments/ (importable when this file is run as a script)
from train_small_model import PHASES


class _Stop(Exception):
    pass


def logged(run: Path) -> list[dict]:
    """The records of ``<run>/history.jsonl`` (one per logged step), or [] before the first."""
    path = run / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_variant(name: str, steps: int, out: Path) -> list[dict]:
    """Train variant ``name`` ("default" or "tied") for ``steps`` steps of phase 1 in
    ``<out>/<name>`` (resuming or skipping as the run folder allows); its logged records."""
    run = out / name
    if not any(r["step"] >= steps for r in logged(run)):
        _, config, data = PHASES[0]
        model = init_from_scratch(
            build_sam_from_config(MODEL_CONFIGS["vit_small"]), seed=config.seed, tie_cross_attention=name == "tied"
        )

        def stop_after(step: int, total: int, result) -> None:
            # called before step ``step`` is logged and saved: stop one step later
            if step > steps:
                raise _Stop

        try:
            train(model, data, config, run, progress=stop_after, log_every=10)
        except _Stop:
            pass
    return [r for r in logged(run) if r["step"] <= steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per variant (a multiple of 25, "
                        "so that the last one is saved)")
    parser.add_argument("--variants", nargs="+", choices=("default", "tied"), default=["default", "tied"])
    parser.add_argument("--out", default="runs/plateau")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.variants:
        history = run_variant(name, args.steps, Path(args.out))
        first = next((r["step"] for r in history if r["last_round_iou"] >= 0.1), None)
        windows = []
        for start in range(0, args.steps, 50):
            values = [r["last_round_iou"] for r in history if start < r["step"] <= start + 50]
            windows.append(f"{np.mean(values):.2f}" if values else "-")
        print(f"{name}: first step with last-round IoU >= 0.1: {first}; mean IoU per 50 steps: {' '.join(windows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
