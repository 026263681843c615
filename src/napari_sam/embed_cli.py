"""``napari-sam-embed``: precompute the image embeddings of an image, a stack or a folder into zarr stores.

The stores (:mod:`napari_sam.embedding_store`, docs/embedding-store.md) are what the plugin's
"Embeddings store" field, ``napari_sam.segment(store=...)``, :class:`~napari_sam.TiledPredictor`
and :class:`~napari_sam.TiledAutomaticMaskGenerator` read, so that no embedding is computed twice.

* INPUT is an image file (2-D grayscale or colour), a stack (a multi-page or Z TIFF, read with
  its axes by :mod:`napari_sam.utils.imread`: plane ``i`` of the C-order plane list is
  ``plane_index`` ``i`` of the store) or a folder (``--output`` is then a folder that gets one
  ``<stem>.zarr`` per image; files without an image suffix are skipped).
* Every tile of every plane is embedded through :class:`~napari_sam.tiling.TileEmbeddings`, so the
  crops and the display mapping are exactly those of the plugin. Tiles already in the store are
  skipped (only their content hash is read): rerunning after an interruption resumes where it
  stopped, and rerunning a finished store computes nothing.
* Tiling: ``--tile-shape`` (default: the model's input size, e.g. 1024 for vit_b, 256 for
  vit_small) and ``--halo`` (default: an eighth of the tile shape). ``--tile-shape 0`` (or
  ``--no-tiling``) stores one embedding per plane: the tile shape is the plane's shape and the
  halo 0, which is the untiled embedding of the whole plane.
* Display mapping: uint8 images are used as they are; other dtypes get ``--contrast-limits`` or,
  by default, one mapping for the whole file (the robust percentiles of
  :func:`napari_sam.tiling.shared_contrast_limits` over all its planes), printed so that the
  viewer can use the same (a store keeps one group per mapping).

* Batch runs (``pip install 'napari-sam[distributed]'``): ``--workers N`` starts a local dask
  cluster, ``--scheduler ADDRESS`` uses a running one; each file is one task that writes its own
  store, on workers that load the model once (:func:`napari_sam.batch.run_embed_batch`, the
  engine of ``napari-sam-amg --workers``; docs/batch.md). Same stores, bit for bit, with the same
  torch threads (``--threads``).

Exit status: 0 success, 1 some file failed (it is reported; the others are still done), 2 bad
arguments, a model that cannot be loaded, or an output that cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

PROG = "napari-sam-embed"


def _size_pair(text: str, example: str) -> tuple[int, int]:
    """``N`` or ``H,W`` as a (y, x) pair of non-negative ints (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected N or H,W (e.g. {example}), not {text!r}") from error
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected N or H,W of sizes zero or positive, not {text!r}")
    return values


def _tile_shape(text: str) -> tuple[int, int]:
    values = _size_pair(text, "1024 or 1024,768")
    if 0 in values and values != (0, 0):
        raise argparse.ArgumentTypeError(f"expected N or H,W of positive sizes (or 0 for no tiling), not {text!r}")
    return values


def _halo(text: str) -> tuple[int, int]:
    return _size_pair(text, "128")


def _limits(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 100,4000), not {text!r}") from error
    if not high > low:
        raise argparse.ArgumentTypeError(f"HIGH must be greater than LOW, got {text!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (built on demand, never at import time)."""
    from .cli import _model_type_help

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Precompute Segment Anything image embeddings of an image, a stack (multi-page TIFF) or a folder "
            "into zarr embedding stores that the napari plugin and napari_sam.segment(store=...) reuse. "
            "Interrupted runs resume: tiles already stored are skipped."
        ),
        epilog=(
            "Examples: napari-sam-embed slide.tif --output slide.zarr --model-type vit_b;  "
            "napari-sam-embed stack.tif --output stack.zarr --tile-shape 0;  "
            "napari-sam-embed images/ --output stores/ --tile-shape 512 --halo 64;  "
            "napari-sam-embed images/ --output stores/ --workers 4 (a local dask cluster: one file per task, "
            "each worker loads the model once; pip install 'napari-sam[distributed]'). "
            "Store layout and validity rules: docs/embedding-store.md; batch runs: docs/batch.md."
        ),
    )
    parser.add_argument("input", metavar="INPUT", help="An image file, a stack (multi-page TIFF) or a folder of images.")
    parser.add_argument(
        "--output", "-o", required=True, metavar="STORE.zarr",
        help="The store to write (created, or resumed when it exists); for a folder INPUT, a folder that gets "
        "one <stem>.zarr per image.",
    )
    parser.add_argument(
        "--model-type", default=None,
        help=f"One of: {_model_type_help()}; detected from --checkpoint if omitted; without both: the best model "
        "whose weights are available offline.",
    )
    parser.add_argument("--checkpoint", default=None, help="Path to the SAM checkpoint (.pth).")
    parser.add_argument(
        "--tile-shape", type=_tile_shape, default=None, metavar="N|H,W",
        help="Size of each embedded crop, halo included (default: the model's input size, e.g. 1024 for vit_b, 256 "
        "for vit_small); 0: no tiling, one embedding per plane.",
    )
    parser.add_argument("--no-tiling", action="store_true", help="Same as --tile-shape 0.")
    parser.add_argument(
        "--halo", type=_halo, default=None, metavar="N|H,W",
        help="Context around each tile's core on each side (default: an eighth of the tile shape).",
    )
    parser.add_argument("--device", default=None,
                        help="torch device (cpu, cuda, cuda:1, mps); default: auto (cuda, then mps, then cpu).")
    parser.add_argument(
        "--contrast-limits", type=_limits, default=None, metavar="LOW,HIGH",
        help="Display mapping of non-uint8 images (default: robust percentiles over the whole file); use the "
        "contrast limits you will have in the viewer. uint8 images are used as they are.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Delete existing stores and compute them again.")
    parser.add_argument(
        "--recompute-mismatched", action="store_true",
        help="A store of another model, tiling or image is emptied and recomputed (default: that file fails), "
        "and tiles whose pixels changed are recomputed.",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    from .batch import add_distributed_arguments

    add_distributed_arguments(parser)  # the flags of napari-sam-amg: --workers/--scheduler, --threads, ...
    return parser


@dataclass
class FileResult:
    """What was done with one input file: tiles computed, tiles already stored, or why it failed.

    Attributes:
        name: the input file's name.
        computed: tile embeddings computed and stored.
        stored: tiles that were already stored (skipped).
        error: why the file failed, or None.
        planes: unused (kept for callers that fill it).
        status: ``"done"``, ``"skipped"`` (every tile was already stored; set by batch runs) or ``"failed"``.
    """

    name: str
    computed: int = 0
    stored: int = 0
    error: Optional[str] = None
    planes: list = field(default_factory=list)
    status: str = "done"


def _plan(input_path: Path, output: Path, reasons: Optional[dict] = None) -> tuple[list[tuple[Any, Path]], list[str], list[str]]:
    """(layout, store path) per image of INPUT, failed file names, skipped file names (see :func:`plan_stores`).

    Raises:
        CliError: INPUT missing, two images writing one store, or an output that is not usable.
    """
    from .cli import list_targets

    return plan_stores(list_targets(input_path), output, input_path.is_dir(), reasons)


def plan_stores(
    targets: Sequence[Path], output: Path, folder: bool, reasons: Optional[dict] = None
) -> tuple[list[tuple[Any, Path]], list[str], list[str]]:
    """Read every file's header and decide its store (messages printed).

    Args:
        targets: the input files.
        output: the store (``folder`` False: one image) or the folder of ``<stem>.zarr`` stores.
        folder: whether ``output`` is a folder of stores; a file that cannot be read is then an
            error only when its suffix is an image's (else it is skipped).
        reasons: when given, filled with failed file name -> the read error's message.

    Returns:
        ((layout, store path) per image, failed file names, skipped file names).

    Raises:
        CliError: two images writing one store, or an output that is not usable.
    """
    from .cli import CliError, probe_targets

    plans, failed, skipped = [], [], []
    owners: dict[Path, Path] = {}
    for target, layout in probe_targets(targets, PROG, not folder, failed, skipped, reasons):
        destination = output / f"{target.stem}.zarr" if folder else output
        if destination in owners:
            raise CliError(f"{target.name} and {owners[destination].name} would both write {destination}; rename one.")
        owners[destination] = target
        plans.append((layout, destination))
    for _, destination in plans:
        if destination.exists() and not (destination / "zarr.json").is_file():
            if destination.is_dir() and not any(destination.iterdir()):
                continue
            raise CliError(f"{str(destination)!r} exists and is not a zarr store; choose another --output.")
    if folder and output.exists() and not output.is_dir():
        raise CliError(f"--output {str(output)!r} exists and is not a folder (INPUT is a folder).")
    return plans, failed, skipped


def _file_limits(planes: Sequence[Any], given: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
    """The one display mapping of a file's planes (None: uint8 used as it is)."""
    import numpy as np

    from .tiling import shared_contrast_limits

    if np.dtype(planes[0].dtype) in (np.uint8, np.bool_):
        return None
    if given is not None:
        return given
    if len(planes) == 1:
        return shared_contrast_limits(planes[0])
    stacked = np.concatenate([np.asarray(p) for p in planes], axis=0)  # (n*H, W[, C]): one sample of all planes
    return shared_contrast_limits(stacked)


def embed_file(
    layout: Any,
    destination: Path,
    sam: Any,
    model_type: str,
    *,
    tile_shape: Optional[tuple[int, int]] = None,
    halo: Optional[tuple[int, int]] = None,
    contrast_limits: Optional[tuple[float, float]] = None,
    overwrite: bool = False,
    recompute: bool = False,
    precision: str = "fp32",
    progress: bool = True,
    log: Any = print,
) -> FileResult:
    """Embed every tile of every plane of one file into its store, skipping tiles already stored.

    Args:
        layout: the file's :class:`~napari_sam.utils.imread.ImageLayout`.
        destination: the store folder.
        sam: the model (on its device).
        model_type: its type name (recorded in the store).
        tile_shape: (th, tw), (0, 0) for one tile per plane, or None for the model's input size.
        halo: (hy, hx), or None for an eighth of the tile shape (0 without tiling).
        contrast_limits: the display mapping of non-uint8 images, or None for the file's robust percentiles.
        overwrite: delete an existing store first.
        recompute: empty a store of another model, tiling or image, and recompute changed tiles.
        precision: the encoder's precision ("fp32", "bf16", "fp16"), recorded in the store.
        progress: show a progress bar over tiles (stderr).
        log: called with a line describing the file's tiling, mapping and store.

    Returns:
        The :class:`FileResult` (tiles computed and already stored).

    Raises:
        ImageReadError: the pixels cannot be read.
        StoreMismatchError: the store does not fit and ``recompute`` is False.
        Exception: whatever the encoder or the store raises.
    """
    from tqdm import tqdm

    from .embedding_store import EmbeddingStore
    from .predictor import SamPredictor
    from .tiling import NoCache, TileEmbeddings, TileGrid, default_halo, default_tile_shape
    from .utils.imread import read_planes

    planes = [plane for _, plane in read_planes(layout)]
    input_size = int(sam.image_encoder.img_size)
    plane_shape = (layout.height, layout.width)
    if tile_shape == (0, 0):
        tile_shape, halo = plane_shape, (0, 0)
    tile_shape = tuple(tile_shape) if tile_shape is not None else default_tile_shape(input_size)
    halo = tuple(halo) if halo is not None else default_halo(tile_shape)
    grid = TileGrid(plane_shape, tile_shape, halo)
    limits = _file_limits(planes, contrast_limits)
    store = EmbeddingStore(
        destination, sam, model_type=model_type, tile_shape=tile_shape, halo=halo,
        mode="w" if overwrite else "a", on_mismatch="recompute" if recompute else "error", n_planes=len(planes),
        precision=precision,
    )
    predictor = SamPredictor(sam, precision=precision)
    result = FileResult(layout.path.name)
    total = len(planes) * len(grid)
    mapping = "uint8 as it is" if limits is None else f"contrast limits {limits[0]:g},{limits[1]:g}"
    log(f"  {len(planes)} plane(s) x {len(grid)} tile(s) of {tile_shape[0]}x{tile_shape[1]} (halo {halo[0]},{halo[1]}), "
          f"{mapping} -> {destination}")
    with tqdm(total=total, desc=layout.path.name, unit="tile", disable=not progress, file=sys.stderr) as bar:
        for plane_index, plane in enumerate(planes):
            tiles = TileEmbeddings(
                predictor, plane, grid, contrast_limits=limits, store=store, plane_index=plane_index,
                cache=NoCache(), cache_key=(str(destination), plane_index),
            )
            for tile in grid:
                if store.contains(plane_index, tile, tiles.contrast_limits, tiles.pixels(tile)):
                    result.stored += 1
                else:
                    tiles.get(tile)
                    result.computed += 1
                bar.update(1)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line tool.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 if any file failed, 2 for bad arguments, an unusable model or output.
    """
    from .cli import CliError, distributed_missing, resolve_checkpoint

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_tiling:
        if args.tile_shape not in (None, (0, 0)):
            parser.error("--no-tiling and --tile-shape exclude each other")
        args.tile_shape = (0, 0)
    if args.tile_shape == (0, 0) and args.halo not in (None, (0, 0)):
        parser.error("--halo needs tiling (a --tile-shape other than 0)")
    if args.tile_shape is not None and args.halo is not None and args.tile_shape != (0, 0):
        if any(2 * h >= t for h, t in zip(args.halo, args.tile_shape)):
            parser.error(f"--halo {args.halo} leaves no core in tiles of {args.tile_shape}: it must be less than half")
    if args.overwrite and args.recompute_mismatched:
        parser.error("--overwrite and --recompute-mismatched exclude each other")
    distributed = args.workers is not None or args.scheduler is not None
    if distributed and (missing := distributed_missing()):
        print(f"{PROG}: error: {missing}", file=sys.stderr)
        return 2
    try:
        from .embedding_store import _zarr

        _zarr()
    except ImportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    reasons: dict[str, str] = {}
    try:
        plans, failed, skipped = _plan(Path(args.input), output, reasons)
        model_type, checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
    except CliError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    if distributed:
        from . import batch

        if Path(args.input).is_dir() and plans:
            output.mkdir(parents=True, exist_ok=True)
        options = batch.EmbedOptions(args.tile_shape, args.halo, args.contrast_limits, args.overwrite,
                                     args.recompute_mismatched)
        return batch.main_embed_distributed(
            plans, reasons, skipped, batch.ModelChoice(model_type, checkpoint, "fp32", args.device, args.threads),
            options, workers=args.workers, scheduler=args.scheduler, memory_limit=args.memory_limit,
            resources=args.resources, progress=not args.no_progress,
        )

    try:
        from .models import build_model, resolve_device

        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)

        device = resolve_device(args.device)
        print(f"Loading model {model_type} from {checkpoint} on {device}...")
        sam = build_model(model_type, checkpoint).to(device=device).eval()
    except Exception as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    from .embedding_store import StoreMismatchError
    from .utils.imread import ImageReadError

    computed = stored = 0
    for layout, destination in plans:
        print(f"Embedding {layout.path.name!r} ({layout.describe()})...")
        try:
            if Path(args.input).is_dir():
                output.mkdir(parents=True, exist_ok=True)
            result = embed_file(
                layout, destination, sam, model_type, tile_shape=args.tile_shape, halo=args.halo,
                contrast_limits=args.contrast_limits, overwrite=args.overwrite, recompute=args.recompute_mismatched,
                progress=not args.no_progress,
            )
        except KeyboardInterrupt:
            raise
        except ImageReadError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            failed.append(layout.path.name)
            continue
        except StoreMismatchError as error:
            print(f"{PROG}: {layout.path.name}: {error}", file=sys.stderr)
            failed.append(layout.path.name)
            continue
        except Exception as error:
            print(f"Failed on {layout.path.name!r} ({layout.describe()}): {type(error).__name__}: {error}",
                  file=sys.stderr)
            failed.append(layout.path.name)
            continue
        computed += result.computed
        stored += result.stored
        print(f"  {result.computed} tile(s) computed, {result.stored} already stored")
    if skipped:
        print(f"Skipped {len(skipped)} file(s) that are not images: {', '.join(skipped)}", file=sys.stderr)
    print(f"Summary: {computed} tile(s) computed, {stored} already stored, {len(failed)} file(s) failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
