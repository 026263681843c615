"""``napari-sam-amg``: automatic mask generation for an image or a folder of images.

The reference's ``scripts/amg.py`` with the same flags and outputs, and its bugs fixed:

* ``--crop-overlap-ratio`` is a float (the reference's is an int, its issue #259);
* ``--device`` defaults to "auto": CUDA when available, then Apple MPS, else the CPU (the
  reference: always CUDA);
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
import sys
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

class CliError(Exception):
    """A problem with the arguments or outputs, reported before any work (exit status 2)."""


def _setting_type(setting: Any) -> Any:
    """An argparse ``type`` that parses one AMG setting and checks its bounds."""

    def parse(text: str) -> Any:
        value = setting.type(text)  # ValueError: argparse says "invalid int value: 'x'"
        try:
            setting.check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error
        return value

    parse.__name__ = setting.type.__name__  # argparse names the type in "invalid int value" errors
    return parse


def build_parser(settings_class: Optional[type] = None) -> argparse.ArgumentParser:
    """The argument parser (built on demand, never at import time).

    Args:
        settings_class: :class:`~napari_sam.amg_settings.AmgSettings` (default) or a
            subclass; one flag per field of its ``tunable_fields()``, default None (not given).

    Returns:
        The parser.
    """
    from .amg_settings import AmgSettings
    from .models import model_types

    settings_class = settings_class or AmgSettings
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
        help=f"One of {', '.join(model_types(user_facing=True, aliases=True))}; detected from --checkpoint if "
        "omitted; without both: the best model whose weights are available offline (cached official weights, "
        "else the bundled small model).",
    )
    parser.add_argument("--checkpoint", default=None, help="Path to the SAM checkpoint (.pth).")
    parser.add_argument("--device", default=None,
                        help="torch device (cpu, cuda, cuda:1, mps); default: auto (cuda, then mps, then cpu).")
    parser.add_argument(
        "--convert-to-rle", action="store_true",
        help="Write <stem>.json with COCO RLE masks instead of a folder of PNGs.",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 (the reference's results), bf16 (faster, CPU or GPU) or fp16 (GPU).")
    parser.add_argument("--overwrite", action="store_true", help="Replace outputs that already exist.")
    group = parser.add_argument_group(
        "AMG settings (default: the reference's defaults; for vit_small, "
        "its own lower --pred-iou-thresh, --stability-score-thresh and --box-nms-thresh)"
    )
    for setting in settings_class.tunable_fields():
        group.add_argument(
            setting.flag, dest=setting.name, type=_setting_type(setting), default=None,
            metavar=setting.type.__name__.upper(), help=f"{setting.help} Default: {setting.default:g}.",
        )
    return parser


def resolve_checkpoint(model_type: Optional[str], checkpoint: Optional[str]) -> tuple[str, str]:
    """(model type, checkpoint path) from ``--model-type`` and ``--checkpoint``.

    With ``--checkpoint``, that file is used; its type is detected from the tensor shapes
    when ``--model-type`` is not given. Without it, the known weights of ``--model-type``
    come from the cache folder, downloaded once with a progress bar. Without both, the model
    is :func:`napari_sam.models.default_model_type`: cached official weights, else the small
    model bundled in the package, offline (the reference's script has no default checkpoint).

    Raises:
        CliError: the checkpoint is missing or unreadable, the model type is unknown, or the
            weights cannot be downloaded (the message says where to put a manual download).
    """
    from .models import CheckpointError, canonical_type, default_model_type, detect_model_type, model_entry
    from .models.weights import DownloadError
    from .models.weights import resolve_checkpoint as resolve_known

    try:
        if model_type is not None:
            model_type = model_entry(model_type).name
        if checkpoint is None:
            model_type = model_type or default_model_type()
            return model_type, os.fspath(resolve_known(model_type))
        if model_type is None:
            from .models import read_state_dict

            model_type = detect_model_type(read_state_dict(checkpoint))
        return canonical_type(model_type), os.fspath(resolve_known(model_type, checkpoint))
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
    """Write the outputs of one image whole or not at all (see :func:`napari_sam.utils.files.atomic_write`).

    Raises:
        FileExistsError: ``destination`` exists (it may have appeared during the run) and
            ``overwrite`` is False.
    """
    from .utils.files import atomic_write, write_json_atomically

    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} appeared during the run; not replaced.")
    if rle:
        write_json_atomically(destination, records)
        return
    if destination.exists() and not destination.is_dir():
        destination.unlink()
    with atomic_write(destination, directory=True) as folder:
        write_masks_to_folder(records, folder)


def _generate_with_progress(generator, image, name: str) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from .utils.progress import drain

    with tqdm(desc=name, unit="batch", leave=False, file=sys.stderr) as bar:
        def advance(progress: Any) -> None:
            bar.total = progress.total
            bar.update(progress.done - bar.n)

        return drain(generator.generate_iter(image), advance)


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

    from .amg_settings import AmgSettings
    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .models import build_model, resolve_device

    try:
        device = resolve_device(args.device)
        print(f"Loading model {model_type} from {checkpoint} on {device}...")
        sam = build_model(model_type, checkpoint).to(device=device)
        given = {f.name: getattr(args, f.name) for f in AmgSettings.tunable_fields() if getattr(args, f.name) is not None}
        model_thresholds = {k: v for k, v in AmgSettings.model_overrides(model_type).items() if k not in given}
        if model_thresholds:
            print(f"Thresholds for {model_type}: " + ", ".join(f"{k} {v}" for k, v in model_thresholds.items())
                  + " (the reference's defaults keep no mask of this model; flags override).")
        settings = AmgSettings.for_model(model_type, output_mode="coco_rle" if rle else "binary_mask", **given)
        generator = SamAutomaticMaskGenerator(sam, settings=settings, precision=args.precision)
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
