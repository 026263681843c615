"""``napari-sam-amg``: automatic mask generation for an image or a folder of images.

The reference's ``scripts/amg.py`` with the same flags and outputs, and its bugs fixed:

* ``--crop-overlap-ratio`` is a float (the reference's is an int, its issue #259);
* ``--device`` defaults to CUDA when available, else the CPU (the reference: always CUDA);
* an output that already exists is refused up front, before any work, unless ``--overwrite``
  (the reference crashes half-way on a second run);
* whatever scikit-image reads (16-bit TIFF, grayscale, RGBA, ...) is converted as
  ``SamPredictor.set_image`` does; non-image files are reported and skipped; an image that
  fails is reported, the others are still processed, and the exit status is 1 at the end;
* every output appears whole or not at all (written to a temporary name, then renamed);
* a progress bar per image, and ``--precision`` for the faster reduced-precision path.

Outputs, per input ``<stem>.<ext>``: ``<output>/<stem>/<i>.png`` (uint8, 0 or 255) for every
mask plus ``<output>/<stem>/metadata.csv`` (header :data:`METADATA_HEADER`, one row per
mask, ``str()`` of the values, rows joined by newlines, no trailing newline), or with
``--convert-to-rle`` ``<output>/<stem>.json``: the list of records with COCO RLE
``segmentation`` (``counts`` a str that pycocotools decodes).

Exit status: 0 success, 1 some image failed, 2 bad arguments or refused output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)

# Suffixes of files that are meant to be images: a read failure there is an error, elsewhere a skip.
IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".jp2", ".ico",
}

# (flag, keyword of SamAutomaticMaskGenerator, type, help)
AMG_FLAGS = [
    ("--points-per-side", "points_per_side", int, "Points sampled along one side of the image (grid of n*n)."),
    ("--points-per-batch", "points_per_batch", int, "Points decoded together."),
    ("--pred-iou-thresh", "pred_iou_thresh", float, "Keep masks whose predicted IoU is above this."),
    ("--stability-score-thresh", "stability_score_thresh", float, "Keep masks whose stability score is at least this."),
    ("--stability-score-offset", "stability_score_offset", float, "Logit shift used by the stability score."),
    ("--box-nms-thresh", "box_nms_thresh", float, "Box IoU above which duplicate masks are dropped."),
    ("--crop-n-layers", "crop_n_layers", int, "Extra layers of image crops (layer i has (2**i)**2 crops)."),
    ("--crop-nms-thresh", "crop_nms_thresh", float, "Box IoU above which duplicates across crops are dropped."),
    ("--crop-overlap-ratio", "crop_overlap_ratio", float, "Overlap of first-layer crops, fraction of the short side."),
    ("--crop-n-points-downscale-factor", "crop_n_points_downscale_factor", int,
     "Points per side in crop layer i are divided by this to the power i."),
    ("--min-mask-region-area", "min_mask_region_area", int,
     "Fill holes and remove islands smaller than this many pixels (0: off)."),
]


class CliError(Exception):
    """A problem with the arguments or outputs, reported before any work (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (built on demand, never at import time)."""
    parser = argparse.ArgumentParser(
        prog="napari-sam-amg",
        description=(
            "Run Segment Anything's automatic mask generator on an image or on every file of a folder, "
            "writing one PNG per mask plus metadata.csv (or one COCO-RLE JSON file with --convert-to-rle)."
        ),
    )
    parser.add_argument("--input", required=True, help="An image file or a folder of images.")
    parser.add_argument("--output", required=True, help="Folder for the results (created if needed).")
    parser.add_argument(
        "--model-type", default=None,
        help="vit_h, vit_l, vit_b, vit_small (or default = vit_h, vit_test); detected from --checkpoint if "
        "omitted; without both: vit_b, vit_l or vit_h if their weights are cached, else the bundled vit_small.",
    )
    parser.add_argument("--checkpoint", default=None, help="Path to the SAM checkpoint (.pth).")
    parser.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu.")
    parser.add_argument(
        "--convert-to-rle", action="store_true",
        help="Write <stem>.json with COCO RLE masks instead of a folder of PNGs.",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 (the reference's results), bf16 (faster, CPU or GPU) or fp16 (GPU).")
    parser.add_argument("--overwrite", action="store_true", help="Replace outputs that already exist.")
    group = parser.add_argument_group(
        "AMG settings (default: the generator's defaults; for vit_small, "
        "its own lower --pred-iou-thresh and --stability-score-thresh)"
    )
    for flag, _, kind, text in AMG_FLAGS:
        group.add_argument(flag, type=kind, default=None, help=text)
    return parser


def resolve_checkpoint(model_type: Optional[str], checkpoint: Optional[str]) -> tuple[str, str]:
    """(model type, checkpoint path) from ``--model-type`` and ``--checkpoint``.

    With ``--checkpoint``, that file is used; its type is detected from the tensor shapes
    when ``--model-type`` is not given. Without it, the known weights of ``--model-type``
    come from the cache folder, downloaded once with a progress bar
    (:func:`napari_sam.checkpoints.resolve_checkpoint`). Without both, the model is
    :func:`napari_sam.checkpoints.default_model_type`: cached official weights (vit_b,
    vit_l, vit_h in that order), else the small model bundled in the package, offline
    (the reference's script has no default checkpoint).

    Raises:
        CliError: the checkpoint is missing or unreadable, the model type is unknown, or the
            weights cannot be downloaded (the message says where to put a manual download).
    """
    from .build import CheckpointError, detect_model_type, read_state_dict
    from .checkpoints import DownloadError, default_model_type
    from .checkpoints import resolve_checkpoint as resolve_known

    try:
        if checkpoint is None:
            model_type = model_type or default_model_type()
            return ("vit_h" if model_type == "default" else model_type), os.fspath(resolve_known(model_type))
        if model_type is None:
            model_type = detect_model_type(read_state_dict(checkpoint))
        return model_type, os.fspath(resolve_known(model_type, checkpoint))
    except (CheckpointError, DownloadError, FileNotFoundError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise CliError(str(message)) from error


def list_targets(input_path: Path) -> list[Path]:
    """The input file, or every file (not folder) of the input folder, sorted by name."""
    if input_path.is_dir():
        return sorted(p for p in input_path.iterdir() if not p.is_dir())
    if input_path.is_file():
        return [input_path]
    raise CliError(f"--input {str(input_path)!r} does not exist.")


def output_path(output: Path, target: Path, rle: bool) -> Path:
    """Where the results for ``target`` go: ``<output>/<stem>`` or ``<output>/<stem>.json``."""
    return output / (target.stem + ".json") if rle else output / target.stem


def read_image(path: Path):
    """HxWxC or HxW array read by scikit-image (first frame of multi-frame files is not chosen)."""
    from skimage import io

    return io.imread(str(path))


def write_masks_to_folder(records: Sequence[dict[str, Any]], folder: Path) -> None:
    """``<i>.png`` (uint8 0/255) per record plus ``metadata.csv``, as the reference's amg.py."""
    import numpy as np
    from PIL import Image

    rows = [METADATA_HEADER]
    for index, record in enumerate(records):
        mask = np.asarray(record["segmentation"], dtype=bool)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{index}.png", format="PNG")
        values = [
            index, record["area"], *record["bbox"], *record["point_coords"][0], record["predicted_iou"],
            record["stability_score"], *record["crop_box"],
        ]
        rows.append(",".join(str(v) for v in values))
    (folder / "metadata.csv").write_text("\n".join(rows))


def save_atomically(records: list[dict[str, Any]], destination: Path, rle: bool, overwrite: bool) -> None:
    """Write to a temporary sibling, then rename it into place (never half-written)."""
    parent = destination.parent
    if rle:
        from .utils.files import write_json_atomically

        write_json_atomically(destination, records)
        return
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=parent))
    try:
        write_masks_to_folder(records, temp_dir)
        if destination.exists():
            if not overwrite:
                raise FileExistsError(f"{destination} appeared during the run; not replaced.")
            shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
        os.replace(temp_dir, destination)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _generate_with_progress(generator, image, name: str) -> list[dict[str, Any]]:
    from tqdm import tqdm

    runner = generator.generate_iter(image)
    with tqdm(desc=name, unit="batch", leave=False, file=sys.stderr) as bar:
        while True:
            try:
                progress = next(runner)
            except StopIteration as stop:
                return stop.value
            bar.total = progress.total
            bar.update(progress.done - bar.n)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line tool.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 if any image failed, 2 for bad arguments or refused outputs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    rle = bool(args.convert_to_rle)
    output = Path(args.output)
    try:
        targets = list_targets(Path(args.input))
        destinations = {}
        for target in targets:
            destination = output_path(output, target, rle)
            if destination in destinations.values():
                other = next(t for t, d in destinations.items() if d == destination)
                raise CliError(f"{target.name} and {other.name} would both write {destination}; rename one.")
            destinations[target] = destination
        existing = [str(d) for d in destinations.values() if d.exists()]
        if existing and not args.overwrite:
            raise CliError(
                "Output already exists (use --overwrite to replace): " + ", ".join(existing)
            )
        model_type, checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
    except CliError as error:
        print(f"napari-sam-amg: error: {error}", file=sys.stderr)
        return 2

    import torch

    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .build import sam_model_registry
    from .checkpoints import recommended_amg_thresholds

    if model_type not in sam_model_registry:
        print(f"napari-sam-amg: error: unknown --model-type {model_type!r}; "
              f"expected one of {sorted(sam_model_registry)}.", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Loading model {model_type} from {checkpoint} on {device}...")
    try:
        sam = sam_model_registry[model_type](checkpoint=checkpoint)
        sam.to(device=device)
        given = {key: getattr(args, key) for _, key, _, _ in AMG_FLAGS if getattr(args, key) is not None}
        model_thresholds = {k: v for k, v in recommended_amg_thresholds(model_type).items() if k not in given}
        if model_thresholds:
            print(f"Thresholds for {model_type}: " + ", ".join(f"{k} {v}" for k, v in model_thresholds.items())
                  + " (the reference's defaults keep no mask of this model; flags override).")
        amg_kwargs = {**model_thresholds, **given}
        generator = SamAutomaticMaskGenerator(
            sam, output_mode="coco_rle" if rle else "binary_mask", precision=args.precision, **amg_kwargs
        )
    except Exception as error:  # bad checkpoint, device or settings: nothing can run
        print(f"napari-sam-amg: error: {error}", file=sys.stderr)
        return 2

    output.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    skipped: list[str] = []
    for target in targets:
        try:
            image = read_image(target)
        except Exception as error:
            if target.suffix.lower() in IMAGE_SUFFIXES or len(targets) == 1:
                print(f"Could not read image {target.name!r}: {error}", file=sys.stderr)
                failed.append(target.name)
            else:
                print(f"Skipping {target.name!r}: not an image.", file=sys.stderr)
                skipped.append(target.name)
            continue
        print(f"Processing {target.name!r}...")
        try:
            records = _generate_with_progress(generator, image, target.name)
            save_atomically(records, destinations[target], rle, args.overwrite)
        except KeyboardInterrupt:
            raise
        except Exception as error:
            print(f"Failed on {target.name!r}: {type(error).__name__}: {error}", file=sys.stderr)
            failed.append(target.name)
            continue
        print(f"  {len(records)} masks -> {destinations[target]}")
    if failed:
        print(f"Done with errors: {len(failed)} image(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("Done!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
