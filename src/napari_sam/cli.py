"""``napari-sam-amg``: automatic mask generation for an image or a folder of images.

The reference's ``scripts/amg.py`` with the same flags and outputs, and its bugs fixed:

* ``--crop-overlap-ratio`` is a float (the reference's is an int, its issue #259);
* ``--device`` defaults to "auto": CUDA when available, then Apple MPS, else the CPU (the
  reference: always CUDA);
* outputs are checked before any work: one that already exists is refused unless
  ``--overwrite`` (the reference crashes half-way on a second run), an ``--output`` that is
  not a writable folder (or cannot be created) is refused with exit status 2;
* images are read by :mod:`napari_sam.utils.imread`: TIFF with ``tifffile`` and its axes
  (a multi-page grayscale TIFF is a stack, segmented slice by slice, never RGB), other
  formats with imageio; each plane is converted as ``SamPredictor.set_image`` does. Files
  that cannot be read are reported (``could not read <file>: <reason>``); non-image files in
  a folder are skipped; an image that fails is reported, the others are still processed,
  and the exit status is 1 at the end;
* every output appears whole or not at all (written to a temporary ``.<name>.napari-sam-<pid>-
  <hex>.tmp`` sibling, then renamed); the leftovers of a killed run are removed by the next
  run in the same ``--output``;
* a progress bar per image, ``--precision`` for the faster reduced-precision path, and
  ``--coco-format`` for COCO files that pycocotools loads as they are;
* ``--workers N`` / ``--scheduler ADDRESS`` map the files over a dask.distributed cluster
  (:mod:`napari_sam.batch`, docs/batch.md), skipping complete outputs (``--skip-existing`` does
  that in one process too). Both paths write through :func:`process_job`.

Outputs, per input ``<stem>.<ext>`` (a stack's planes get a suffix, see :data:`NAMING_HELP`):
``<output>/<stem>/<i>.png`` (uint8, 0 or 255) for every mask plus ``<output>/<stem>/metadata.csv``
(header :data:`METADATA_HEADER`, one row per mask, ``str()`` of the values, rows joined by
newlines, no trailing newline), or with ``--convert-to-rle`` ``<output>/<stem>.json`` in one of
the formats of :data:`COCO_FORMATS` (see :data:`FORMAT_HELP`).

Exit status: 0 success, 1 some image failed, 2 bad arguments or refused output.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)

# Suffixes of files that are meant to be images: a read failure there is an error, elsewhere a skip.
IMAGE_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".jp2", ".ico",
}

COCO_FORMATS = ("reference", "results", "instances")

NAMING_HELP = (
    "Stacks: a TIFF's axes decide (tifffile, also OME-TIFF and ImageJ): only samples per pixel "
    "(axis S: photometric RGB/RGBA) are colour; every other axis (Z, T, C, unlabelled pages) is "
    "iterated and each 2-D plane segmented on its own. A multi-page grayscale TIFF is thus a stack, "
    "never an RGB(A) image; animated GIF/PNG frames too. PNG folders and reference JSON files are "
    "per plane, named <stem>_<axis><index> with the axis in lower case (unlabelled pages and frames: z) "
    "and the index zero-padded to 3 digits: cells_z003/, cells_z003.json, movie_t012_z000/. "
    "Results and instances JSON files hold a whole stack in <stem>.json, one COCO image per plane "
    "with image_id = plane number + 1 in C order (as napari_sam.io.write_coco_json numbers the "
    "slices of a label stack of the same shape); a single image has image_id 1."
)
FORMAT_HELP = (
    "--coco-format (implies --convert-to-rle): "
    "reference (default) writes <stem>.json as the reference's amg.py: a bare list of the "
    "generator's records (segmentation as COCO RLE, area, bbox, predicted_iou, point_coords, "
    "stability_score, crop_box), which pycocotools' COCO() and loadRes() do not load; "
    "results writes a COCO results list that COCO.loadRes() loads (image_id, category_id 1, "
    "segmentation, score = predicted_iou, bbox, area, plus the record's fields); "
    "instances writes a full COCO instances file that COCO() loads (images, annotations with ids, "
    "categories; iscrowd 0; score too). "
    "Boxes, side by side: the reference format and metadata.csv keep the reference's bbox "
    "[x0, y0, x1 - x0, y1 - y0] (x1, y1 the last covered column and row, so one less than the "
    "number of covered columns/rows: the Python records of SamAutomaticMaskGenerator.generate); "
    "results and instances, like napari_sam.io.write_coco_json, use pycocotools' toBbox: "
    "[x0, y0, x1 - x0 + 1, y1 - y0 + 1] (width = number of covered columns)."
)
FAILURE_HELP = (
    "Bad input: a file that cannot be read is reported as 'could not read <file>: <reason>' (folders: "
    "files without an image suffix are skipped); an image that fails is reported with its size and "
    "the others are still processed; exit status 1 at the end. Before any work, outputs that exist "
    "(without --overwrite), two inputs writing one output, and an --output that is not a writable "
    "folder are refused with exit status 2. Every output is written under a temporary "
    "'.<name>.napari-sam-<pid>-<hex>.tmp' name and renamed when complete; leftovers of a killed run "
    "are removed by the next run into the same --output."
)

EXISTING_HELP = (
    "Existing outputs: outputs are renamed into place whole, so one that exists is complete. In one "
    "process (no --workers/--scheduler) an existing output is refused (exit status 2) unless "
    "--overwrite (redo it) or --skip-existing (keep it, do not compute it). A batch run on dask "
    "(--workers or --scheduler) skips complete outputs by default, so a killed or interrupted run "
    "resumes where it stopped; --overwrite redoes them. Skipped files are counted in the summary."
)
BATCH_HELP = (
    "Batch runs (pip install 'napari-sam[distributed]'): --workers N starts a local dask cluster of N "
    "worker processes, each with one model and --threads torch threads (default: cores // N), memory "
    "bounded by --memory-limit; --scheduler ADDRESS uses a running dask cluster (workers need this "
    "package, the inputs, the checkpoint and --output at the same paths). Each worker loads the model "
    "once; a killed worker's files are redone elsewhere; the run ends with a summary (done, skipped, "
    "failed with reason). See docs/batch.md."
)


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _resources(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected NAME=N[,NAME=N], e.g. GPU=1, not {text!r}") from error


def _model_type_help() -> str:
    """The user-facing model types by menu group, e.g. ``"General SAM: vit_b, vit_l, vit_h
    (alias default); Light microscopy: vit_b_lm, ..."``."""
    from .models.registry import group_of, menu_types, model_entry, model_types

    groups: dict[str, list[str]] = {}
    for name in menu_types():
        groups.setdefault(group_of(model_entry(name)), []).append(name)
    aliases = [a for a in model_types(user_facing=True, aliases=True) if a not in model_types(user_facing=True)]
    text = "; ".join(f"{group}: {', '.join(names)}" for group, names in groups.items())
    return text + (f" (aliases: {', '.join(aliases)})" if aliases else "")


def build_parser(settings_class: Optional[type] = None) -> argparse.ArgumentParser:
    """The argument parser (built on demand, never at import time).

    Args:
        settings_class: :class:`~napari_sam.amg_settings.AmgSettings` (default) or a
            subclass; one flag per field of its ``tunable_fields()``, default None (not given).

    Returns:
        The parser.
    """
    from .amg_settings import AmgSettings

    settings_class = settings_class or AmgSettings
    parser = argparse.ArgumentParser(
        prog="napari-sam-amg",
        description=(
            "Run Segment Anything's automatic mask generator on an image or on every file of a folder, "
            "writing one PNG per mask plus metadata.csv (or one COCO-RLE JSON file with --convert-to-rle)."
        ),
        epilog="\n\n".join(
            textwrap.fill(text, 100, break_on_hyphens=False)
            for text in (NAMING_HELP, FORMAT_HELP, FAILURE_HELP, EXISTING_HELP, BATCH_HELP)
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="An image file or a folder of images.")
    parser.add_argument("--output", required=True, help="Folder for the results (created if needed).")
    parser.add_argument(
        "--model-type", default=None,
        help=f"One of: {_model_type_help()}; detected from --checkpoint if omitted; without both: the best model "
        "whose weights are available offline (cached official weights, else the bundled small model). Weights "
        "not yet downloaded are downloaded once (sizes and licences: docs/plugin.md, 'Choosing a model').",
    )
    parser.add_argument("--checkpoint", default=None, help="Path to the SAM checkpoint (.pth).")
    parser.add_argument("--device", default=None,
                        help="torch device (cpu, cuda, cuda:1, mps); default: auto (cuda, then mps, then cpu).")
    parser.add_argument(
        "--convert-to-rle", action="store_true",
        help="Write <stem>.json with COCO RLE masks instead of a folder of PNGs (format: --coco-format).",
    )
    parser.add_argument(
        "--coco-format", choices=COCO_FORMATS, default=None,
        help="JSON layout (implies --convert-to-rle): reference (default: the reference's list of records), "
        "results (COCO results, for COCO.loadRes / COCOeval) or instances (a COCO instances file). "
        "See below for the boxes of each.",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32 (the reference's results), bf16 (faster, CPU or GPU) or fp16 (GPU).")
    parser.add_argument("--overwrite", action="store_true", help="Replace outputs that already exist.")
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="Keep outputs that already exist (complete) and do not compute them (default with --workers/--scheduler).",
    )
    from .batch import add_distributed_arguments

    add_distributed_arguments(parser)  # --workers/--scheduler, --threads, --resources, --memory-limit
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
    """The input file, or every file (not folder, not hidden) of the input folder, sorted by name."""
    if input_path.is_dir():
        return sorted(p for p in input_path.iterdir() if not p.is_dir() and not p.name.startswith("."))
    if input_path.is_file():
        return [input_path]
    raise CliError(f"--input {str(input_path)!r} does not exist.")


def output_path(output: Path, target: Path, rle: bool, suffix: str = "") -> Path:
    """Where results go: ``<output>/<stem><suffix>`` (PNG folder) or ``<output>/<stem><suffix>.json``."""
    name = target.stem + suffix
    return output / (name + ".json") if rle else output / name


@dataclass
class Job:
    """One input file: its planes and where their results go.

    Attributes:
        target: the input file.
        layout: its planes (:class:`~napari_sam.utils.imread.ImageLayout`).
        destinations: plane index -> output path (PNG folders, reference JSON), or ``{None: path}``
            for one COCO file holding every plane (results, instances).
    """

    target: Path
    layout: Any
    destinations: dict[Optional[tuple[int, ...]], Path]


def probe_targets(
    targets: Sequence[Path], prog: str, named: bool, failed: list, skipped: list,
    reasons: Optional[dict[str, str]] = None,
) -> Iterator[tuple[Path, Any]]:
    """Read every target's header (:func:`napari_sam.utils.imread.probe_image`) and yield
    (target, layout) for the images; the others are printed and listed.

    Args:
        targets: input files.
        prog: the program name that starts the printed lines.
        named: the user named the file (not found in a folder): unreadable means failed even
            without an image suffix.
        failed: gets the names of image files that cannot be read (unreadable, truncated...).
        skipped: gets the names of files that are not images (in a folder, without an image suffix).
        reasons: when given, gets failed file name -> the read error's message.
    """
    from .utils.imread import ImageReadError, is_tiff, probe_image

    for target in targets:
        try:
            layout = probe_image(target)
        except ImageReadError as error:
            if named or target.suffix.lower() in IMAGE_SUFFIXES or is_tiff(target):
                print(f"{prog}: {error}", file=sys.stderr)
                failed.append(target.name)
                if reasons is not None:
                    reasons[target.name] = str(error)
            else:
                print(f"Skipping {target.name!r}: not an image ({error.reason}).", file=sys.stderr)
                skipped.append(target.name)
            continue
        for note in layout.notes:
            print(f"{prog}: note: {note}", file=sys.stderr)
        yield target, layout


def plan_jobs(
    targets: Sequence[Path], output: Path, fmt: Optional[str], reasons: Optional[dict[str, str]] = None
) -> tuple[list[Job], list[str], list[str]]:
    """Read every target's header and decide its outputs (``fmt`` None: PNG folders).

    Args:
        reasons: when given, filled with failed file name -> the read error's message.

    Returns:
        (jobs, failed file names, skipped file names); failures and skips are printed.
    """
    jobs, failed, skipped = [], [], []
    for target, layout in probe_targets(targets, "napari-sam-amg", len(targets) == 1, failed, skipped, reasons):
        if fmt in ("results", "instances"):
            destinations = {None: output_path(output, target, True)}
        else:
            destinations = {i: output_path(output, target, fmt is not None, layout.suffix(i)) for i in layout.indices}
        jobs.append(Job(target, layout, destinations))
    return jobs, failed, skipped


def check_destinations(jobs: Sequence[Job], overwrite: bool, skip_existing: bool = False) -> None:
    """Refuse two inputs writing one output, and outputs that exist unless ``overwrite`` or
    ``skip_existing`` (then existing outputs are complete ones, left alone: see :data:`EXISTING_HELP`).

    Raises:
        CliError: with every clash or existing output named.
    """
    owner: dict[Path, Path] = {}
    for job in jobs:
        for destination in job.destinations.values():
            if destination in owner:
                other = owner[destination]
                raise CliError(
                    f"{job.target.name} and {other.name} would both write {destination}; rename one."
                    if other != job.target else f"{job.target.name} would write {destination} twice."
                )
            owner[destination] = job.target
    existing = [str(d) for d in owner if d.exists() or d.is_symlink()]
    if existing and not overwrite and not skip_existing:
        raise CliError(
            "Output already exists (use --overwrite to replace, or --skip-existing to keep it): " + ", ".join(existing)
        )


def check_output_folder(output: Path) -> None:
    """Refuse an ``--output`` that is not, or cannot become, a writable folder (nothing is created).

    Raises:
        CliError: ``output`` is a file, a parent is a file, or the folder (or the nearest
            existing parent) is not writable.
    """
    if output.exists():
        if not output.is_dir():
            raise CliError(f"--output {str(output)!r} exists and is not a folder.")
        if not os.access(output, os.W_OK | os.X_OK):
            raise CliError(f"--output {str(output)!r} is not writable (permission denied); choose another folder.")
        return
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"Cannot create --output {str(output)!r}: {str(parent)!r} is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(
            f"Cannot create --output {str(output)!r}: {str(parent)!r} is not writable (permission denied)."
        )


def prepare_output_folder(output: Path) -> list[Path]:
    """Create ``output``, prove it writable with a probe file, and remove a killed run's leftovers.

    Returns:
        The stale temporary files and folders removed (see
        :func:`napari_sam.utils.files.remove_stale_temporaries`).

    Raises:
        CliError: the folder cannot be created or written.
    """
    from .utils.files import remove_stale_temporaries, temporary_sibling

    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(output / "write-check")
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise CliError(f"Cannot write to --output {str(output)!r}: {reason}.") from error
    return remove_stale_temporaries(output)


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


def coco_payload(job: Job, planes: Sequence[tuple[tuple[int, ...], list[dict[str, Any]]]], fmt: str) -> Any:
    """The ``results`` list or ``instances`` dict of one input file (see :data:`FORMAT_HELP`)."""
    from .io import amg_records_to_coco

    height, width = job.layout.height, job.layout.width
    images = []
    annotations: list[dict[str, Any]] = []
    for position, (index, records) in enumerate(planes, start=1):
        image = {"id": position, "file_name": job.target.name, "height": height, "width": width}
        if index:
            image["napari_sam_index"] = list(index)
        images.append(image)
        annotations.extend(amg_records_to_coco(records, image_id=position, first_id=len(annotations) + 1))
    if fmt == "results":
        for annotation in annotations:
            del annotation["id"], annotation["iscrowd"]
        return annotations
    return {
        "info": {"description": f"napari-sam-amg masks of {job.target.name}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object"}],
    }


def save_atomically(records: Any, destination: Path, rle: bool, overwrite: bool) -> None:
    """Write one output whole or not at all (see :func:`napari_sam.utils.files.atomic_write`).

    Args:
        records: the generator's records (PNG folder), or the JSON payload (``rle``).
        destination: the output folder or JSON file.
        rle: write JSON instead of a PNG folder.
        overwrite: replace an existing output.

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


def _generate_with_progress(generator, image, name: str, progress: bool = True) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from .utils.progress import drain

    if not progress:
        return drain(generator.generate_iter(image))
    with tqdm(desc=name, unit="batch", leave=False, file=sys.stderr) as bar:
        def advance(progress: Any) -> None:
            bar.total = progress.total
            bar.update(progress.done - bar.n)

        return drain(generator.generate_iter(image), advance)


EXISTING = ("refuse", "overwrite", "skip")


def is_complete(job: Job) -> bool:
    """Whether every output of ``job`` exists (outputs are renamed into place whole, so an existing
    output is a complete one)."""
    return all(d.exists() for d in job.destinations.values())


@dataclass
class ItemResult:
    """What :func:`process_job` did with one input file.

    Attributes:
        name: the input file's name.
        status: ``"done"``, ``"skipped"`` (every output already complete) or ``"failed"``.
        masks: masks written.
        reason: why it failed (``"ImageReadError: could not read ..."``), or None.
        written: the outputs written.
        kept: the outputs that existed and were kept (``existing="skip"``).
    """

    name: str
    status: str
    masks: int = 0
    reason: Optional[str] = None
    written: list = None  # type: ignore[assignment]
    kept: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.written = list(self.written or [])
        self.kept = list(self.kept or [])


def process_job(
    job: Job, generator: Any, fmt: Optional[str], existing: str = "refuse", *,
    progress: bool = True, log: Any = print,
) -> ItemResult:
    """Segment every plane of one input file and write its outputs atomically: the one per-item
    code path of ``napari-sam-amg``, in one process and on dask workers (:mod:`napari_sam.batch`).

    Args:
        job: the file, its planes and their destinations (:func:`plan_jobs`).
        generator: a :class:`~napari_sam.automatic_mask_generator.SamAutomaticMaskGenerator`.
        fmt: None (PNG folders) or one of :data:`COCO_FORMATS`.
        existing: what to do with an output that exists: ``"refuse"`` (FileExistsError),
            ``"overwrite"`` or ``"skip"`` (keep it: it is complete, and its plane is not computed).
        progress: show a progress bar per plane (stderr).
        log: called with a line per output written.

    Returns:
        The :class:`ItemResult` (status ``"done"`` or ``"skipped"``).

    Raises:
        ImageReadError: the pixels cannot be read.
        Exception: whatever the generator or the writing raises (the caller reports it).
    """
    from .utils.imread import read_planes

    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {EXISTING}, not {existing!r}")
    result = ItemResult(job.target.name, "done")
    if existing == "skip" and is_complete(job):
        result.status = "skipped"
        result.kept = list(job.destinations.values())
        return result
    overwrite = existing == "overwrite"
    collected = []
    for index, plane in read_planes(job.layout):
        destination = job.destinations.get(index)
        if existing == "skip" and destination is not None and destination.exists():
            result.kept.append(destination)  # a plane finished by an earlier (killed) attempt
            continue
        name = job.target.name + job.layout.suffix(index)
        records = _generate_with_progress(generator, plane, name, progress)
        result.masks += len(records)
        if None in job.destinations:
            collected.append((index, records))
            continue
        save_atomically(records, destination, fmt is not None, overwrite)
        result.written.append(destination)
        log(f"  {len(records)} masks -> {destination}")
    if None in job.destinations:
        save_atomically(coco_payload(job, collected, fmt), job.destinations[None], True, overwrite)
        result.written.append(job.destinations[None])
        log(f"  {result.masks} masks -> {job.destinations[None]}")
    return result


def run_job(job: Job, generator: Any, fmt: Optional[str], overwrite: bool) -> int:
    """Segment every plane of one file and write its outputs; returns the number of masks
    (:func:`process_job` with ``existing`` "overwrite" or "refuse").

    Raises:
        ImageReadError: the pixels cannot be read.
        Exception: whatever the generator or the writing raises (the caller reports it).
    """
    return process_job(job, generator, fmt, "overwrite" if overwrite else "refuse").masks


def load_generator(model_type: str, checkpoint: str, device: Optional[str], settings: Any, precision: str) -> Any:
    """The automatic mask generator of a model choice (the model built on ``device``)."""
    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .models import build_model, resolve_device

    sam = build_model(model_type, checkpoint).to(device=resolve_device(device))
    return SamAutomaticMaskGenerator(sam, settings=settings, precision=precision)


def failure_reason(error: BaseException) -> str:
    """How a failed item is listed: the read error's message, else ``<Type>: <message>``."""
    from .utils.imread import ImageReadError

    return str(error) if isinstance(error, ImageReadError) else f"{type(error).__name__}: {error}"


def distributed_missing() -> Optional[str]:
    """None when ``dask.distributed`` can be imported, else the message that says how to install it."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return (
            "--workers and --scheduler need dask.distributed: pip install 'napari-sam[distributed]' "
            "(or run without them, in one process)."
        )
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line tool.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 if any image failed, 2 for bad arguments or refused outputs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.overwrite and args.skip_existing:
        parser.error("--overwrite and --skip-existing exclude each other")
    distributed = args.workers is not None or args.scheduler is not None
    if distributed and (missing := distributed_missing()):
        print(f"napari-sam-amg: error: {missing}", file=sys.stderr)
        return 2
    skip_existing = args.skip_existing or (distributed and not args.overwrite)
    existing = "overwrite" if args.overwrite else "skip" if skip_existing else "refuse"
    fmt = args.coco_format or ("reference" if args.convert_to_rle else None)
    output = Path(args.output)
    try:
        targets = list_targets(Path(args.input))
        reasons: dict[str, str] = {}
        jobs, failed, skipped = plan_jobs(targets, output, fmt, reasons)
        check_destinations(jobs, args.overwrite, skip_existing)
        check_output_folder(output)
        model_type, checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
        for stale in prepare_output_folder(output):
            print(f"Removed {stale.name!r}: the unfinished output of an interrupted run.", file=sys.stderr)
    except CliError as error:
        print(f"napari-sam-amg: error: {error}", file=sys.stderr)
        return 2

    from .amg_settings import AmgSettings

    try:
        given = {f.name: getattr(args, f.name) for f in AmgSettings.tunable_fields() if getattr(args, f.name) is not None}
        model_thresholds = {k: v for k, v in AmgSettings.model_overrides(model_type).items() if k not in given}
        if model_thresholds:
            print(f"Thresholds for {model_type}: " + ", ".join(f"{k} {v}" for k, v in model_thresholds.items())
                  + " (the reference's defaults keep no mask of this model; flags override).")
        mode = "coco_rle" if fmt is not None else "binary_mask"
        settings = AmgSettings.for_model(model_type, output_mode=mode, **given)
    except Exception as error:
        print(f"napari-sam-amg: error: {error}", file=sys.stderr)
        return 2

    if distributed:
        from . import batch

        model = batch.ModelChoice(model_type, checkpoint, args.precision, args.device, args.threads)
        return batch.main_distributed(
            jobs, reasons, skipped, model, settings, fmt, existing,
            workers=args.workers, scheduler=args.scheduler, memory_limit=args.memory_limit,
            resources=args.resources,
        )

    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        from .models import resolve_device

        device = resolve_device(args.device)
        print(f"Loading model {model_type} from {checkpoint} on {device}...")
        generator = load_generator(model_type, checkpoint, device, settings, args.precision)
    except Exception as error:  # bad checkpoint, device or settings: nothing can run
        print(f"napari-sam-amg: error: {error}", file=sys.stderr)
        return 2

    from .utils.imread import ImageReadError

    kept = []
    for job in jobs:
        if existing == "skip" and is_complete(job):
            kept.append(job.target.name)
            continue
        print(f"Processing {job.target.name!r} ({job.layout.describe()})...")
        try:
            process_job(job, generator, fmt, existing)
        except KeyboardInterrupt:
            raise
        except ImageReadError as error:
            print(f"napari-sam-amg: {error}", file=sys.stderr)
            failed.append(job.target.name)
        except Exception as error:
            print(
                f"Failed on {job.target.name!r} ({job.layout.describe()}): {type(error).__name__}: {error}",
                file=sys.stderr,
            )
            failed.append(job.target.name)
    if kept:
        print(f"Skipped {len(kept)} file(s) whose outputs are complete: {', '.join(kept)}")
    if skipped:
        print(f"Skipped {len(skipped)} file(s) that are not images: {', '.join(skipped)}", file=sys.stderr)
    if failed:
        print(f"Done with errors: {len(failed)} image(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("Done!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
