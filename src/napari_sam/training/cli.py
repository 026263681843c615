"""``napari-sam-train``: train a SAM from scratch on synthetic data, or fine-tune one on annotated images.

Two subcommands, both writing to an output folder ``OUT_DIR``:

* ``napari-sam-train scratch OUT_DIR [--model-type vit_small] [--steps N] ...`` trains a
  registry model type from random weights (:func:`~napari_sam.training.initialization.init_from_scratch`)
  on endless synthetic microscopy-like images (:class:`~napari_sam.training.data.SyntheticData`);
* ``napari-sam-train finetune OUT_DIR --images PATH... --labels PATH... [--model vit_small]
  [--decoder-only] ...`` fine-tunes a model (a registry type with known weights, a known
  weights name, or a checkpoint path; built by :func:`napari_sam.checkpoints.build_sam`) on
  the user's images and instance label images (files, or folders whose image files are
  paired by sorted file name), read with scikit-image.

What lands in ``OUT_DIR``: ``training_state.pt`` (model, optimizer and step, rewritten
every ``--checkpoint-every`` steps), ``history.jsonl`` (losses), ``run.json`` (the
settings of the run) and, at the end, ``model.pth``: a plain SAM state dict that
``napari_sam.build_sam(path)``, ``sam_model_registry[type](checkpoint=path)`` and the
napari widgets load.

Resuming: running the same command again after an interruption continues from the last
training state, with the same data and prompts the run would have seen. With one CPU
thread (``--threads 1``) a resumed run ends with bit-for-bit the same weights as an
uninterrupted one; with more threads, two runs of the same steps already differ in the last
bits, so they agree only statistically. Different settings for an
unfinished run are refused (its ``run.json`` says which); ``--overwrite`` discards the
previous run in ``OUT_DIR`` and starts from step 0. A finished run (``model.pth`` exists)
is never replaced without ``--overwrite``.

Exit status: 0 success, 2 bad arguments, unreadable or inconsistent inputs, or a refused
output folder (with a message, no traceback), 130 interrupted (Ctrl-C; resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

# Suffixes of image files taken from a folder (the same set as napari-sam-amg reads).
from ..cli import IMAGE_SUFFIXES
from .config import TrainConfig

PROG = "napari-sam-train"
RUN_FILE = "run.json"
STATE_FILE = "training_state.pt"
MODEL_FILE = "model.pth"
HISTORY_FILE = "history.jsonl"

RESUME_HELP = (
    "Resumable: the run writes OUT_DIR/training_state.pt every --checkpoint-every steps; running the same "
    "command again continues from there (same data and prompts; with --threads 1, the same final weights to the "
    "bit). At the end the trained "
    "weights are written to OUT_DIR/model.pth (load them with napari_sam.build_sam(path) or in the napari "
    "plugin). Use --overwrite to discard a previous run in OUT_DIR and start again."
)


class CliError(Exception):
    """A problem with the arguments, inputs or output folder (exit status 2)."""


# --------------------------------------------------------------------------- parser
def _add_training_options(parser: argparse.ArgumentParser, *, steps: int, lr: float, images_per_step: int) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=steps, help=f"Optimizer steps (default: {steps}).")
    group.add_argument("--images-per-step", type=int, default=images_per_step,
                       help=f"Images per batch (default: {images_per_step}).")
    group.add_argument("--objects-per-image", type=int, default=8,
                       help="Most objects prompted per image, chosen at random (default: 8).")
    group.add_argument("--iterations", type=int, default=3,
                       help="Prompt rounds per object: the first prompt (point or box), then corrective points "
                       "(default: 3).")
    group.add_argument("--lr", type=float, default=lr, help=f"Peak learning rate of AdamW (default: {lr:g}).")
    group.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05).")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="Linear warm-up steps before the cosine decay (default: 10%% of --steps, at most 100).")
    group.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="fp32, or bf16 autocast for the forward pass (faster on recent CPUs and GPUs).")
    group.add_argument("--compile", action="store_true",
                       help="Run the image encoder, mask decoder and mask loss through torch.compile (needs a C++ "
                       "compiler on CPU): minutes of compiling first, then somewhat faster steps. Worth it only for long "
                       "runs.")
    group.add_argument("--seed", type=int, default=0, help="Seed of data, prompts and initial weights (default: 0).")
    group.add_argument("--checkpoint-every", type=int, default=50,
                       help="Steps between resumable training states (default: 50).")
    group.add_argument("--min-object-area", type=int, default=16,
                       help="Objects smaller than this (pixels, in the model's input frame) are not prompted "
                       "(default: 16).")
    group.add_argument("--distractor-probability", type=float, default=0.0,
                       help="Chance that a step prompted by points adds a negative point on another object, so "
                       "that a negative click on a neighbour does not cut the object (not in SAM's recipe; "
                       "default: 0).")
    group.add_argument("--corrective-fraction", type=float, default=1.0,
                       help="Share of each step's prompted objects (drawn at random) that go on to the corrective "
                       "rounds; less makes a step cheaper (not in SAM's recipe; default: 1, every object).")
    group.add_argument("--iou-head-only", action="store_true",
                       help="Calibrate only the IoU prediction head (every other weight frozen, so masks do not "
                       "change) on prompts like automatic mask generation's: --objects-per-image points per image "
                       "drawn anywhere, background included; each output's target is its best IoU with any "
                       "object. After training, it makes the automatic mask generator rank masks better (not in "
                       "SAM's recipe).")
    run = parser.add_argument_group("run")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    run.add_argument("--processes", type=int, default=1,
                     help="Data-parallel training processes on this CPU (each takes a share of every batch and of "
                     "--threads; needs --images-per-step at least as large). Meant for many-core machines: on 2 "
                     "cores it saves little (default: 1).")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu).")
    run.add_argument("--overwrite", action="store_true",
                     help="Discard a previous run in OUT_DIR (model.pth, training state, history) and start from "
                     "step 0.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (built on demand; imports neither torch nor the model code)."""
    from ..models import bundled_model_type, model_types

    bundled = bundled_model_type()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train Segment Anything from scratch on synthetic images, or fine-tune it on your annotated "
        "images. " + RESUME_HELP,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{scratch,finetune}")

    scratch = commands.add_parser(
        "scratch", help="Train a model type from random weights on synthetic microscopy-like images.",
        description="Train a SAM model type from random weights on endless synthetic microscopy-like images "
        "(nuclei, cells, shapes). " + RESUME_HELP,
    )
    scratch.add_argument("out_dir", metavar="OUT_DIR", help="Folder for the training state and model.pth (created).")
    scratch.add_argument("--model-type", default=bundled,
                         help=f"Model type to build: {', '.join(model_types())} (default: {bundled}).")
    scratch.add_argument("--kind", choices=("nuclei", "cells", "shapes", "phase"), default=None,
                         help="Only this kind of synthetic image (default: a random mix of nuclei, cells, shapes).")
    scratch.add_argument("--occlusion-probability", type=float, default=1.0,
                         help="Chance that a synthetic image's objects may overlap, a later one covering an earlier "
                         "one; otherwise they only touch (default: 1).")
    scratch.add_argument("--tie-cross-attention", action="store_true",
                         help="Start the mask decoder's cross-attention with keys tied to queries, so that the "
                         "decoder leaves its early all-background plateau sooner (not in SAM).")
    _add_training_options(scratch, steps=1000, lr=4e-4, images_per_step=4)

    finetune = commands.add_parser(
        "finetune", help="Fine-tune a model on images with instance label images.",
        description="Fine-tune a SAM on images with instance label images (0 = background, one integer id per "
        "object, as a napari Labels layer holds them), with simulated point, box and corrective-click prompts. "
        + RESUME_HELP,
    )
    finetune.add_argument("out_dir", metavar="OUT_DIR", help="Folder for the training state and model.pth (created).")
    finetune.add_argument("--images", nargs="+", required=True, metavar="PATH",
                          help="Image files, or folders of image files (taken in sorted file-name order).")
    finetune.add_argument("--labels", nargs="+", required=True, metavar="PATH",
                          help="Label image files or folders, paired with --images in the same order; each an "
                          "integer HxW image of its image's height and width.")
    finetune.add_argument("--model", default=bundled,
                          help=f"Starting weights: a model type with known weights ({bundled}, the bundled model; "
                          f"{', '.join(t for t in model_types(user_facing=True) if t != bundled)}, downloaded once), "
                          f"or a checkpoint path (default: {bundled}).")
    finetune.add_argument("--decoder-only", action="store_true",
                          help="Freeze the image encoder and train only the prompt encoder and mask decoder "
                          "(image embeddings computed once: fast on a CPU, even for vit_h).")
    finetune.add_argument("--no-augment", action="store_true",
                          help="No random flips and 90-degree rotations of the images.")
    _add_training_options(finetune, steps=200, lr=1e-4, images_per_step=2)
    return parser


# --------------------------------------------------------------------------- inputs
def list_images(paths: Sequence[str], option: str) -> list[Path]:
    """Files named by ``paths``: a file as is, a folder as its image files sorted by name.

    Raises:
        CliError: a path does not exist, or a folder holds no image file.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CliError(f"{option} folder {name!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"{option} {name!r} does not exist.")
    return files


def _read(path: Path, what: str):
    from skimage import io

    try:
        return io.imread(str(path))
    except Exception as error:  # skimage/imageio raise many types for unreadable files
        raise CliError(f"Could not read {what} {str(path)!r}: {error}") from error


def read_annotations(image_files: Sequence[Path], label_files: Sequence[Path]) -> tuple[list, list]:
    """Read and check image / label-image pairs.

    Images: HxW or HxWxC (C = 1, 3, 4) of any real dtype. Labels: HxW (or HxWx1)
    non-negative integer (or bool) arrays of the image's height and width.

    Raises:
        CliError: different counts, unreadable files, wrong shapes or dtypes, no object at all.
    """
    import numpy as np

    if len(image_files) != len(label_files):
        raise CliError(
            f"--images gives {len(image_files)} image file(s) but --labels gives {len(label_files)} label "
            "image(s); they are paired in order, so the counts must match."
        )
    images, labels = [], []
    for image_path, label_path in zip(image_files, label_files):
        image = np.asarray(_read(image_path, "image"))
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))) or image.dtype.kind not in "biuf":
            raise CliError(
                f"Image {str(image_path)!r} has shape {image.shape} and dtype {image.dtype}; expected a 2-D image "
                "(HxW grayscale, or HxWxC with C = 1, 3 or 4 channels last) of real numbers."
            )
        label = np.asarray(_read(label_path, "label image"))
        if label.ndim == 3 and label.shape[2] == 1:
            label = label[..., 0]
        if label.dtype.kind not in "iub":
            raise CliError(
                f"Label image {str(label_path)!r} has dtype {label.dtype}; expected integer instance labels "
                "(0 = background, one id per object)."
            )
        if label.shape != image.shape[:2]:
            raise CliError(
                f"Label image {str(label_path)!r} has shape {label.shape}, which does not match the height and "
                f"width {image.shape[:2]} of its image {str(image_path)!r}; a label image must be HxW with one "
                "integer id per object."
            )
        if label.dtype.kind == "i" and label.size and label.min() < 0:
            raise CliError(f"Label image {str(label_path)!r} has negative values; expected 0 and positive ids.")
        images.append(image)
        labels.append(label.astype(np.uint8) if label.dtype.kind == "b" else label)
    if not any(np.any(label) for label in labels):
        raise CliError("The label images hold no object (all pixels are 0): nothing to train on.")
    return images, labels


# --------------------------------------------------------------------------- output folder
def check_out_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Check ``out`` against ``settings``; return whether an unfinished run is resumed.

    Changes nothing on disk (see :func:`discard_run`).

    Raises:
        CliError: a finished run without ``overwrite``, an unfinished run with other
            settings, or ``out`` is a file.
    """
    if out.exists() and not out.is_dir():
        raise CliError(f"OUT_DIR {str(out)!r} exists and is not a folder.")
    if overwrite:
        return False  # the previous run's files are removed once the model is built (discard_run)
    if (out / MODEL_FILE).exists():
        raise CliError(
            f"{out / MODEL_FILE} already exists (a finished run); use --overwrite to train again from the start, "
            "or choose another OUT_DIR."
        )
    if not (out / STATE_FILE).exists():
        return False
    run_file = out / RUN_FILE
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and previous != settings:
            changed = _differences(previous, settings)
            raise CliError(
                f"{out} holds an unfinished run with other settings ({changed}); run the same command to resume "
                "it, or add --overwrite to start again."
            )
    return True


def discard_run(out: Path) -> None:
    """Remove a previous run's files from ``out`` (``--overwrite``); other files stay."""
    for name in (MODEL_FILE, STATE_FILE, HISTORY_FILE, RUN_FILE):
        path = out / name
        if path.is_file():
            path.unlink()


def _differences(previous: dict, current: dict, prefix: str = "") -> str:
    out = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            nested = _differences(old, new, f"{prefix}{key}.")
            if nested:
                out.append(nested)
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} before, {new!r} now")
    return "; ".join(out)


def _write_json_atomic(path: Path, value: Any) -> None:
    from ..utils.files import atomic_write

    with atomic_write(path) as temp:
        temp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- running
def _config(args: argparse.Namespace, decoder_only: bool, augment: bool) -> TrainConfig:
    occlusion = getattr(args, "occlusion_probability", 0.0)  # a setting of the synthetic data (scratch only)
    if not 0.0 <= occlusion <= 1.0:
        raise CliError(f"--occlusion-probability must be between 0 and 1, got {occlusion}.")
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, max(1, args.steps // 10))
    try:
        return TrainConfig(
            steps=args.steps, images_per_step=args.images_per_step, objects_per_image=args.objects_per_image,
            iterations=args.iterations, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup,
            decoder_only=decoder_only, precision=args.precision, seed=args.seed,
            checkpoint_every=args.checkpoint_every, min_object_area=args.min_object_area, augment=augment,
            distractor_probability=args.distractor_probability, iou_head_only=args.iou_head_only,
            torch_compile=args.compile, processes=args.processes, corrective_fraction=args.corrective_fraction,
        )
    except ValueError as error:  # TrainConfig checks the ranges; its message starts with the setting's name
        setting, _, rest = str(error).partition(" ")
        raise CliError(f"--{setting.replace('_', '-')} {rest}") from None


class _ProgressBar:
    """tqdm bar over the steps, created at the first step (so a resumed run starts where it left off)."""

    def __init__(self) -> None:
        self.bar = None
        self.last = None

    def __call__(self, done: int, total: int, result) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done - 1, unit="step", desc="training", file=sys.stderr,
                            dynamic_ncols=True)
        self.last = result
        self.bar.set_postfix({"loss": f"{result.loss:.4f}", "last-round IoU": f"{result.last_round_iou:.3f}"},
                             refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if args.command == "scratch":
        from ..models import model_types

        if args.model_type not in model_types():
            raise CliError(f"Unknown --model-type {args.model_type!r}; expected one of {', '.join(model_types())}.")
        model_spec = args.model_type
        inputs: dict[str, Any] = {
            "kind": args.kind, "occlusion_probability": args.occlusion_probability,
            "tie_cross_attention": args.tie_cross_attention,
        }
        images = labels = None
    else:
        model_spec = args.model
        if Path(model_spec).suffix or os.sep in model_spec or "/" in model_spec:
            if not Path(model_spec).is_file():
                raise CliError(f"--model checkpoint {model_spec!r} does not exist.")
            model_spec = str(Path(model_spec).resolve())
        image_files = list_images(args.images, "--images")
        label_files = list_images(args.labels, "--labels")
        inputs = {"images": [str(p.resolve()) for p in image_files], "labels": [str(p.resolve()) for p in label_files]}
        images, labels = read_annotations(image_files, label_files)

    augment = not getattr(args, "no_augment", False)
    config = _config(args, decoder_only=getattr(args, "decoder_only", False), augment=augment)
    settings = {"command": args.command, "model": model_spec, **inputs, "config": asdict(config)}
    resuming = check_out_dir(out, settings, args.overwrite)

    import torch

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    from ..models import CheckpointError, build_model, create_model, resolve_device
    from ..models.weights import DownloadError
    from . import trainer
    from .data import AnnotatedImages, SyntheticData
    from .initialization import init_from_scratch

    try:
        device = torch.device(resolve_device(args.device))
    except ValueError as error:
        raise CliError(f"Bad --device {args.device!r}: {error}") from error
    if args.command == "scratch":
        # Seeded before building: init_from_scratch re-draws linear layers and norms only, and the
        # convolutions, embeddings and random Fourier features are drawn at construction.
        torch.manual_seed(config.seed)
        model = init_from_scratch(
            build_model(args.model_type), seed=config.seed,
            tie_cross_attention=args.tie_cross_attention,
        )
        model.to(device)
        data = SyntheticData(seed=config.seed, kind=args.kind, occlusion_probability=args.occlusion_probability)
        what = f"{args.model_type} from scratch on synthetic images"
    else:
        try:
            model = create_model(model_spec, device=device)
        except (CheckpointError, DownloadError, FileNotFoundError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise CliError(f"Could not load --model {args.model!r}: {message}") from error
        data = AnnotatedImages(images, labels, seed=config.seed, augment=augment)
        what = (f"{args.model} on {len(images)} annotated image(s)"
                + (" (decoder only, encoder frozen)" if config.decoder_only else ""))

    if args.overwrite:
        discard_run(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / RUN_FILE, settings)
    state = out / STATE_FILE
    if resuming:
        print(f"Resuming the run in {out} from {state}.")
    print(f"Training {what}: {config.steps} steps on {device}; resumable from {state}; "
          f"the model will be written to {out / MODEL_FILE}.")
    bar = _ProgressBar()
    try:
        trainer.train(model, data, config, out, progress=bar)
    except KeyboardInterrupt:
        bar.close()  # before the message, so that it is not drawn over
        print(f"\nInterrupted. Run the same command again to resume from {state} "
              f"(saved every {config.checkpoint_every} steps).", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if bar.last is not None:
        print(f"Finished {config.steps} steps: last loss {bar.last.loss:.4f}, "
              f"last-round IoU {bar.last.last_round_iou:.3f}.")
    print(f"Wrote {out / MODEL_FILE} (load it with napari_sam.build_sam({str(out / MODEL_FILE)!r}) or in the "
          "napari plugin).")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line tool.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for bad arguments, inputs or output folder, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except CliError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
