"""Batch runs on ``dask.distributed``: one engine for ``napari-sam-amg`` and ``napari-sam-embed``
with ``--workers N`` / ``--scheduler ADDRESS``, and for Python (:func:`run_batch`, :func:`run_embed_batch`).

Work items are input files (a stack's planes stay one item). They are mapped over a dask
client by :func:`map_items`; dask schedules them, retries the items of a worker that died on
another worker, and shows its dashboard. Each worker process builds the model of a
:class:`ModelChoice` (type, checkpoint path, precision, device, torch threads) once and keeps it:
:class:`SamWorkerPlugin` (registered with ``client.register_plugin``) loads it when the worker
starts, and the tasks, which carry the model *choice* and never the model, find it there.
The automatic mask generator of each :class:`~napari_sam.amg_settings.AmgSettings` is made from
that model on first use and kept.

* Automatic segmentation (:func:`run_item`): each task runs :func:`napari_sam.cli.process_job`,
  the command line's per-file code path, so outputs are byte-identical to a one-process run with
  the same torch threads, and are written atomically (a killed worker leaves only a temporary
  sibling, removed at the end of the run).
* Embedding precompute (:func:`embed_item`): each task runs :func:`napari_sam.embed_cli.embed_file`
  on one input file and its own store (``<stem>.zarr``), so no two workers write one store. Tiles
  already stored are skipped, so a store that is complete costs a read of the image and its
  content hashes, and the retry of a killed worker's file resumes its store.

A task never raises for a bad image: it returns a failed result with the reason, so one bad
file fails alone.

``dask`` is imported only when a function here needs it (``import napari_sam.batch`` is light);
install it with ``pip install 'napari-sam[distributed]'``. See docs/batch.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from .cli import ItemResult, Job

PLUGIN_NAME = "napari-sam-model"
INSTALL_HINT = "pip install 'napari-sam[distributed]'"


@dataclass(frozen=True)
class ModelChoice:
    """What each worker loads (sent instead of the model).

    Attributes:
        model_type: a registry type (``vit_b``, ``vit_small``, ...).
        checkpoint: the weights file; it must exist at this path on every worker.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: torch device on the worker (None: auto).
        threads: torch intra-op threads on the worker (None: leave the worker's default, which
            is 1 under a dask nanny since it sets ``OMP_NUM_THREADS=1``).
    """

    model_type: str
    checkpoint: str
    precision: str = "fp32"
    device: Optional[str] = None
    threads: Optional[int] = None


@dataclass
class BatchResult:
    """A batch run's summary.

    Attributes:
        done: the items computed (:class:`~napari_sam.cli.ItemResult` of automatic segmentation,
            :class:`~napari_sam.embed_cli.FileResult` of embedding precompute).
        skipped: names of files whose outputs were already complete, or that are not images.
        failed: file name -> reason.
        work: what the done items produced: ``"masks"`` or ``"tiles"`` (tile embeddings computed).
    """

    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    work: str = "masks"

    @property
    def exit_status(self) -> int:
        """0, or 1 when anything failed."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """E.g. ``"8 done (123 masks), 1 skipped, 1 failed:\\n  bad.png: could not read ..."``
        (embedding: ``"8 done (96 tiles computed), ..."``)."""
        if self.work == "tiles":
            detail = f"{sum(item.computed for item in self.done)} tiles computed"
        else:
            detail = f"{sum(item.masks for item in self.done)} masks"
        text = f"{len(self.done)} done ({detail}), {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.failed:
            text += ":\n" + "\n".join(f"  {name}: {reason}" for name, reason in self.failed.items())
        return text


class ModelLoadError(RuntimeError):
    """The workers could not load the model (e.g. the checkpoint is not at the same path on them)."""


# --- the worker side -----------------------------------------------------------------------------

_MODELS: dict = {}  # per worker process: ModelChoice -> model; one model per worker
_GENERATORS: dict = {}  # per worker process: (ModelChoice, AmgSettings) -> generator of that model
_MAX_GENERATORS = 8
_LOAD_LOCK = threading.RLock()
_RUN_LOCK = threading.Lock()  # one item at a time per worker process, whatever its dask threads


def _model_for(model: ModelChoice) -> Any:
    """The model of a choice in this process, built once (torch threads set first); a new choice
    replaces the old one (and its generators)."""
    with _LOAD_LOCK:
        if model not in _MODELS:
            import torch

            from .models import build_model, resolve_device

            if model.threads is not None:
                torch.set_num_threads(model.threads)
            _MODELS.clear()
            _GENERATORS.clear()
            _MODELS[model] = build_model(model.model_type, model.checkpoint).to(device=resolve_device(model.device)).eval()
        return _MODELS[model]


def _generator_for(model: ModelChoice, settings: Any) -> Any:
    """The automatic mask generator of a model choice and settings in this process, made from the
    model of :func:`_model_for` on first use and kept (the last few settings)."""
    with _LOAD_LOCK:
        sam = _model_for(model)
        key = (model, settings)
        if key not in _GENERATORS:
            from .automatic_mask_generator import SamAutomaticMaskGenerator

            if len(_GENERATORS) >= _MAX_GENERATORS:
                _GENERATORS.pop(next(iter(_GENERATORS)))
            _GENERATORS[key] = SamAutomaticMaskGenerator(sam, settings=settings, precision=model.precision)
        return _GENERATORS[key]


class _PluginState:
    """The part of :class:`SamWorkerPlugin` that needs no dask (mixed into the plugin class)."""

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, model: ModelChoice, settings: Any = None) -> None:
        self.model = model
        self.settings = settings
        self.sam = None

    def setup(self, worker: Any = None) -> None:
        self.sam = _model_for(self.model)
        if self.settings is not None:  # made now, so that bad settings fail the registration
            _generator_for(self.model, self.settings)

    @property
    def generator(self) -> Any:
        """The automatic mask generator of the plugin's settings (None without settings)."""
        return None if self.settings is None else _generator_for(self.model, self.settings)

    def __getstate__(self) -> dict:
        return {"model": self.model, "settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["settings"])


def _plugin_class() -> type:
    from distributed.diagnostics.plugin import WorkerPlugin

    cls = type("SamWorkerPlugin", (_PluginState, WorkerPlugin), {
        "__module__": __name__,
        "__doc__": "Loads the model of a :class:`ModelChoice` once per worker (``client.register_plugin``); "
        "``SamWorkerPlugin(model, settings=None)``: with AMG settings, their generator is made too.",
    })
    cls.__qualname__ = "SamWorkerPlugin"
    return cls


def __getattr__(name: str) -> Any:
    # SamWorkerPlugin subclasses distributed's WorkerPlugin, so it is made on first use: importing this
    # module does not import dask. Made once and kept, so pickle finds it by name on the workers.
    if name == "SamWorkerPlugin":
        cls = _plugin_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _set_threads(model: ModelChoice) -> None:
    if model.threads is not None:
        import torch

        if torch.get_num_threads() != model.threads:  # e.g. something else in the worker changed it
            torch.set_num_threads(model.threads)


def run_item(job: Job, model: ModelChoice, settings: Any, fmt: Optional[str], existing: str) -> ItemResult:
    """One automatic segmentation task: segment ``job`` with this worker's model and write its
    outputs; never raises for a bad file (returns a failed result with the reason)."""
    from .cli import failure_reason, process_job

    with _RUN_LOCK:
        try:
            generator = _generator_for(model, settings)
            _set_threads(model)
            return process_job(job, generator, fmt, existing, progress=False, log=lambda line: None)
        except Exception as error:
            return ItemResult(job.target.name, "failed", reason=failure_reason(error))


@dataclass(frozen=True)
class EmbedOptions:
    """How every file of an embedding run is embedded (see :func:`napari_sam.embed_cli.embed_file`).

    Attributes:
        tile_shape: (th, tw), (0, 0) for one tile per plane, or None for the model's input size.
        halo: (hy, hx), or None for an eighth of the tile shape.
        contrast_limits: (low, high) of non-uint8 images, or None for each file's robust percentiles.
        overwrite: delete existing stores first.
        recompute: empty a store of another model, tiling or image (and recompute changed tiles)
            instead of failing the file.
    """

    tile_shape: Optional[tuple[int, int]] = None
    halo: Optional[tuple[int, int]] = None
    contrast_limits: Optional[tuple[float, float]] = None
    overwrite: bool = False
    recompute: bool = False


def _embed(layout: Any, destination: Path, sam: Any, model: ModelChoice, options: EmbedOptions) -> Any:
    """Embed one file into its store; the :class:`~napari_sam.embed_cli.FileResult` has status
    "skipped" when every tile was already stored, "failed" (with the reason) instead of raising."""
    from .cli import failure_reason
    from .embed_cli import FileResult, embed_file

    try:
        result = embed_file(
            layout, Path(destination), sam, model.model_type, tile_shape=options.tile_shape, halo=options.halo,
            contrast_limits=options.contrast_limits, overwrite=options.overwrite, recompute=options.recompute,
            precision=model.precision, progress=False, log=lambda line: None,
        )
    except Exception as error:
        return FileResult(layout.path.name, status="failed", error=failure_reason(error))
    result.status = "skipped" if result.computed == 0 and result.stored > 0 else "done"
    return result


def embed_item(item: tuple[Any, str], model: ModelChoice, options: EmbedOptions) -> Any:
    """One embedding task: embed the file of ``item`` = (its :class:`~napari_sam.utils.imread.ImageLayout`,
    its store path) with this worker's model, skipping stored tiles; never raises for a bad file.

    Returns:
        The :class:`~napari_sam.embed_cli.FileResult` (status "done", "skipped" or "failed").
    """
    layout, destination = item
    with _RUN_LOCK:
        try:
            sam = _model_for(model)
            _set_threads(model)
        except Exception as error:
            from .cli import failure_reason
            from .embed_cli import FileResult

            return FileResult(layout.path.name, status="failed", error=failure_reason(error))
        return _embed(layout, destination, sam, model, options)


# --- the driver side -----------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--workers``/``--scheduler`` (exclusive), ``--threads``, ``--resources`` and ``--memory-limit``
    to a command's parser: the batch flags of ``napari-sam-amg`` and ``napari-sam-embed``."""
    from .cli import _positive_int, _resources

    batch = parser.add_argument_group("batch runs on dask.distributed (see below and docs/batch.md)")
    where = batch.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="Start a local dask cluster of N worker processes (default: one process, no dask).")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="Run on an existing dask cluster, e.g. tcp://10.0.0.5:8786.")
    batch.add_argument(
        "--threads", type=_positive_int, default=None, metavar="T",
        help="torch threads per process (one process: torch's default; --workers N: cores // N; "
        "--scheduler: the workers' default, 1 under a dask nanny).",
    )
    batch.add_argument(
        "--resources", type=_resources, default=None, metavar="NAME=N[,NAME=N]",
        help="dask resources each file needs, e.g. GPU=1: only workers started with them "
        "(dask worker --resources GPU=1) take files.",
    )
    batch.add_argument(
        "--memory-limit", default="auto", metavar="BYTES",
        help="Memory limit of each local worker, e.g. 4GiB (default auto: the machine's memory / N); a worker "
        "above it is restarted by dask and its file redone elsewhere.",
    )


# dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes AMG about 1.5x slower (a fixed
# threshold also turns off glibc's dynamic mmap threshold: every large tensor is a fresh mmap, page faults
# and all; measured with bench_distributed.py). Local clusters start their workers without it.
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def start_local_cluster(
    workers: int, threads: Optional[int] = None, memory_limit: Union[str, int] = "auto",
    resources: Optional[dict] = None,
) -> Any:
    """A ``LocalCluster`` of ``workers`` processes on 127.0.0.1, one task at a time each, and its client.

    The workers start without dask's ``MALLOC_TRIM_THRESHOLD_`` (:data:`WORKER_DASK_CONFIG`).

    Args:
        workers: worker processes.
        threads: torch threads per worker (default: cores // workers, at least 1); dask runs one
            task at a time per worker (``threads_per_worker=1``), torch uses these threads.
        memory_limit: per worker, e.g. ``"4GiB"`` or bytes; ``"auto"``: the machine's memory / workers.
        resources: dask resources each worker has (e.g. ``{"GPU": 1}``), so that tasks that need them run.

    Returns:
        (client, torch threads per worker).
    """
    from dask.utils import parse_bytes
    from distributed import Client, LocalCluster
    from distributed.system import MEMORY_LIMIT

    threads = threads or max(1, available_cores() // workers)
    limit = MEMORY_LIMIT // workers if memory_limit in (None, "auto") else parse_bytes(memory_limit)
    import dask

    with dask.config.set(WORKER_DASK_CONFIG):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            memory_limit=limit, dashboard_address="127.0.0.1:0", **({"resources": resources} if resources else {}),
        )
    return Client(cluster), threads


def register_model(client: Any, model: ModelChoice, settings: Any = None) -> None:
    """Make every worker of ``client`` (and every worker that joins later) load ``model`` now
    (:class:`SamWorkerPlugin`; with ``settings``, their AMG generator too).

    Raises:
        ModelLoadError: a worker could not load it.
    """
    from .cli import failure_reason

    plugin = __getattr__("SamWorkerPlugin")(model, settings)
    try:
        client.register_plugin(plugin, name=PLUGIN_NAME)
    except Exception as error:
        raise ModelLoadError(f"the dask workers could not load the model: {failure_reason(error)}") from error


def map_items(
    task: Callable[..., Any],
    items: Sequence[Any],
    names: Sequence[str],
    client: Any = None,
    *,
    local: Optional[Callable[[Any], Any]] = None,
    progress: bool = True,
    desc: str = "napari-sam",
    resources: Optional[dict] = None,
    **task_kwargs: Any,
) -> list[tuple[str, Any, Optional[str]]]:
    """Run one task per item on a dask client, with a progress bar over items: the driver loop of
    every batch run.

    Args:
        task: a module-level function ``task(item, **task_kwargs)`` run on the workers.
        items: the work items (picklable, small: they travel to the workers).
        names: each item's name (the file name), as listed in failures.
        client: a ``distributed.Client``, or None to run ``local(item)`` in this process.
        local: what runs an item in this process (needed when ``client`` is None).
        progress: show a progress bar over items (stderr).
        desc: the progress bar's label (the command's name).
        resources: dask resources each task needs, e.g. ``{"GPU": 1}``.
        **task_kwargs: passed to every ``task`` call (small: sent with each task).

    Returns:
        (name, result, None) for each item whose task returned, (name, None, reason) for each
        whose task raised (e.g. ``KilledWorker``: the item killed every worker it ran on), in
        the order they finished. The futures are cancelled at the end (also on an interruption),
        so the workers release the results.
    """
    from tqdm import tqdm

    from .cli import failure_reason

    outcomes: list[tuple[str, Any, Optional[str]]] = []
    with tqdm(total=len(items), unit="file", desc=desc, file=sys.stderr, disable=not progress) as bar:
        if client is None:
            if items and local is None:
                raise ValueError("map_items without a client needs local, the function that runs an item here")
            for item, name in zip(items, names):
                try:
                    outcomes.append((name, local(item), None))
                except Exception as error:
                    outcomes.append((name, None, failure_reason(error)))
                bar.update()
        elif items:
            from distributed import as_completed

            run = uuid.uuid4().hex[:8]  # keys unique per run: a key seen before could return an old result
            keys = [f"{desc}-{run}-{i}-{name}" for i, name in enumerate(names)]
            futures = client.map(task, items, key=keys, pure=False, resources=resources, **task_kwargs)
            by_key = dict(zip(keys, names))
            try:
                for future in as_completed(futures):
                    try:
                        outcomes.append((by_key[future.key], future.result(), None))
                    except Exception as error:
                        outcomes.append((by_key[future.key], None, failure_reason(error)))
                    bar.update()
            finally:
                client.cancel(futures)
    return outcomes


def _collect(outcomes: Iterable[tuple[str, Any, Optional[str]]], result: BatchResult) -> BatchResult:
    """File the outcomes of :func:`map_items` into ``result`` by their status."""
    for name, item, reason in outcomes:
        if reason is None and item.status == "failed":
            reason = getattr(item, "reason", None) or getattr(item, "error", None) or "failed"
        if reason is not None:
            result.failed[name] = reason
        elif item.status == "skipped":
            result.skipped.append(name)
        else:
            result.done.append(item)
    return result


def run_jobs(
    jobs: Sequence[Job], model: ModelChoice, settings: Any, fmt: Optional[str] = None, existing: str = "skip",
    client: Any = None, *, progress: bool = True, resources: Optional[dict] = None,
) -> BatchResult:
    """Run planned automatic segmentation jobs (:func:`napari_sam.cli.plan_jobs`) on ``client``, or
    in this process when None.

    ``resources`` (e.g. ``{"GPU": 1}``): each task needs this much of the workers' dask resources,
    so only workers started with them (``dask worker --resources GPU=1``) take files.

    Jobs whose outputs are all complete are skipped here (``existing="skip"``) without a task.
    After the run, temporaries of killed workers are removed from the output folders (on this
    machine: a remote worker's leftovers go at the next run's start, as the CLI does).

    Returns:
        The :class:`BatchResult`.

    Raises:
        ModelLoadError: the workers could not load the model (nothing was run).
    """
    from .cli import is_complete, process_job

    result = BatchResult()
    todo = []
    for job in jobs:
        if existing == "skip" and is_complete(job):
            result.skipped.append(job.target.name)
        else:
            todo.append(job)
    names = [job.target.name for job in todo]
    if client is None:
        generator = _generator_for(model, settings) if todo else None  # a model that cannot load raises here

        def local(job: Job) -> ItemResult:
            _set_threads(model)  # as a worker's task does (the model may have been built before, elsewhere)
            return process_job(job, generator, fmt, existing, progress=False, log=lambda line: None)

        outcomes = map_items(run_item, todo, names, None, local=local, progress=progress, desc="napari-sam-amg")
    else:
        if todo:
            register_model(client, model, settings)  # every worker loads the model now
        outcomes = map_items(run_item, todo, names, client, progress=progress, desc="napari-sam-amg",
                             resources=resources, model=model, settings=settings, fmt=fmt, existing=existing)
    _collect(outcomes, result)
    _remove_leftovers(jobs)
    return result


def _remove_leftovers(jobs: Iterable[Job]) -> None:
    from .utils.files import remove_stale_temporaries

    for folder in {d.parent for job in jobs for d in job.destinations.values()}:
        for stale in remove_stale_temporaries(folder):
            print(f"Removed {stale.name!r}: the unfinished output of a killed worker.", file=sys.stderr)


def _model_choice(model: Union[ModelChoice, str, None]) -> ModelChoice:
    from .cli import resolve_checkpoint

    return model if isinstance(model, ModelChoice) else ModelChoice(*resolve_checkpoint(model, None))


def _paths(inputs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[Path]:
    return [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]


def run_batch(
    inputs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    output: Union[str, os.PathLike],
    model: Union[ModelChoice, str, None] = None,
    settings: Any = None,
    client: Any = None,
    *,
    fmt: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    resources: Optional[dict] = None,
) -> BatchResult:
    """Segment image files or folders into ``output``, on a ``dask.distributed`` client.

    Args:
        inputs: an image file or a folder, or a list of them (folders: every file, sorted).
        output: the output folder (created).
        model: a :class:`ModelChoice`, or a model type (its known weights; None: the CLI's default).
        settings: :class:`~napari_sam.amg_settings.AmgSettings` (default: the model's defaults).
        client: a ``distributed.Client`` (None: in this process).
        fmt: None (PNG folders and metadata.csv) or a COCO format (``reference``, ``results``, ``instances``).
        overwrite: redo complete outputs (default: skip them).
        progress: show a progress bar.
        resources: dask resources each task needs, e.g. ``{"GPU": 1}`` (see :func:`run_jobs`).

    Returns:
        The :class:`BatchResult` (``exit_status`` 1 when anything failed).

    Raises:
        napari_sam.cli.CliError: a missing input, two inputs writing one output, an unusable output folder.
        ModelLoadError: the workers could not load the model.
    """
    from .amg_settings import AmgSettings
    from .cli import check_destinations, check_output_folder, list_targets, plan_jobs, prepare_output_folder

    output = Path(output)
    targets = [target for path in _paths(inputs) for target in list_targets(path)]
    model = _model_choice(model)
    if settings is None:
        settings = AmgSettings.for_model(model.model_type, output_mode="binary_mask" if fmt is None else "coco_rle")
    reasons: dict[str, str] = {}
    jobs, failed, skipped = plan_jobs(targets, output, fmt, reasons)
    check_destinations(jobs, overwrite, skip_existing=not overwrite)
    check_output_folder(output)
    prepare_output_folder(output)
    result = run_jobs(jobs, model, settings, fmt, "overwrite" if overwrite else "skip", client, progress=progress,
                      resources=resources)
    result.skipped.extend(skipped)
    result.failed.update(reasons)
    return result


def run_embed_plans(
    plans: Sequence[tuple[Any, Path]], model: ModelChoice, options: EmbedOptions, client: Any = None, *,
    progress: bool = True, resources: Optional[dict] = None,
) -> BatchResult:
    """Embed planned files (:func:`napari_sam.embed_cli.plan_stores`: (layout, store path) each) on
    ``client``, or in this process when None; one task per file and its store.

    Returns:
        The :class:`BatchResult` (``work`` "tiles"; a store that was already complete is skipped).

    Raises:
        ModelLoadError: the workers could not load the model (nothing was run).
    """
    items = [(layout, str(destination)) for layout, destination in plans]
    names = [layout.path.name for layout, _ in plans]
    if client is None:
        sam = _model_for(model) if items else None  # a model that cannot load raises here

        def local(item: tuple[Any, str]) -> Any:
            _set_threads(model)  # as a worker's task does (the model may have been built before, elsewhere)
            return _embed(item[0], Path(item[1]), sam, model, options)

        outcomes = map_items(embed_item, items, names, None, local=local, progress=progress, desc="napari-sam-embed")
    else:
        if items:
            register_model(client, model)
        outcomes = map_items(embed_item, items, names, client, progress=progress, desc="napari-sam-embed",
                             resources=resources, model=model, options=options)
    return _collect(outcomes, BatchResult(work="tiles"))


def run_embed_batch(
    inputs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    output: Union[str, os.PathLike],
    model: Union[ModelChoice, str, None] = None,
    client: Any = None,
    *,
    tile_shape: Optional[Union[int, tuple[int, int]]] = None,
    halo: Optional[Union[int, tuple[int, int]]] = None,
    contrast_limits: Optional[tuple[float, float]] = None,
    overwrite: bool = False,
    recompute: bool = False,
    progress: bool = True,
    resources: Optional[dict] = None,
) -> BatchResult:
    """Precompute the embedding stores of image files or folders, on a ``dask.distributed`` client:
    ``napari-sam-embed`` with ``--workers``/``--scheduler`` in Python.

    Each input file is one task that writes its own store: ``output`` itself for one image file,
    ``<output>/<stem>.zarr`` for each image of a folder or a list. Tiles already stored are
    skipped, so a second run computes nothing and a run after an interruption (or a killed worker)
    resumes. Stores match the one-process ``napari-sam-embed`` bit for bit with the same model,
    precision, torch and torch threads.

    Args:
        inputs: an image file or a folder, or a list of them (folders: every file, sorted; files
            without an image suffix are skipped).
        output: the store (one image file) or the folder of stores (created).
        model: a :class:`ModelChoice` (its precision is the encoder's and is recorded in the stores),
            or a model type (its known weights; None: the CLI's default).
        client: a ``distributed.Client`` (None: in this process).
        tile_shape: an int, (th, tw), 0 or (0, 0) for one embedding per plane, or None for the
            model's input size.
        halo: an int, (hy, hx), or None for an eighth of the tile shape.
        contrast_limits: (low, high) display mapping of non-uint8 images (None: each file's robust
            percentiles over all its planes).
        overwrite: delete existing stores and compute them again.
        recompute: empty stores of another model, tiling or image instead of failing those files.
        progress: show a progress bar over files.
        resources: dask resources each task needs, e.g. ``{"GPU": 1}``.

    Returns:
        The :class:`BatchResult` (``exit_status`` 1 when anything failed).

    Raises:
        napari_sam.cli.CliError: a missing input, two inputs writing one store, an output that is
            not a store (or not a folder).
        ValueError: a bad tile shape or halo, or both ``overwrite`` and ``recompute``.
        ModelLoadError: the workers could not load the model.
    """
    from .cli import list_targets
    from .embed_cli import plan_stores
    from .tiling import TileGrid, as_pair

    tile_shape, halo = as_pair(tile_shape, "tile_shape"), as_pair(halo, "halo")
    if overwrite and recompute:
        raise ValueError("overwrite and recompute exclude each other.")
    if tile_shape == (0, 0):
        if halo not in (None, (0, 0)):
            raise ValueError(f"A halo of {halo} needs tiling (a tile shape other than 0).")
    elif tile_shape is not None:
        TileGrid(tile_shape, tile_shape, halo if halo is not None else (0, 0))  # validates sizes and halo
    output = Path(output)
    paths = _paths(inputs)
    targets = [target for path in paths for target in list_targets(path)]
    folder = len(paths) != 1 or paths[0].is_dir()
    reasons: dict[str, str] = {}
    plans, failed, skipped = plan_stores(targets, output, folder, reasons)
    if folder and plans:
        output.mkdir(parents=True, exist_ok=True)
    options = EmbedOptions(tile_shape, halo, None if contrast_limits is None else tuple(contrast_limits),
                           overwrite, recompute)
    result = run_embed_plans(plans, _model_choice(model), options, client, progress=progress, resources=resources)
    result.skipped.extend(skipped)
    result.failed.update(reasons)
    return result


def _main_on_cluster(
    prog: str, model: ModelChoice, run: Callable[[Any, ModelChoice], BatchResult], failed: dict, skipped: list, *,
    workers: Optional[int] = None, scheduler: Optional[str] = None, memory_limit: Union[str, int] = "auto",
    resources: Optional[dict] = None,
) -> int:
    """Start or reach the cluster, print where it runs and the dashboard link, ``run(client, model)``
    (``model`` with the local workers' threads), print the summary; returns the exit status."""
    from distributed import Client

    try:
        if scheduler is not None:
            client = Client(scheduler)
            where = f"the dask cluster at {scheduler} ({len(client.scheduler_info().get('workers', {}))} workers)"
        else:
            client, threads = start_local_cluster(workers, model.threads, memory_limit, resources)
            model = ModelChoice(model.model_type, model.checkpoint, model.precision, model.device, threads)
            limit = next(iter(client.scheduler_info()["workers"].values()), {}).get("memory_limit")
            where = (f"a local dask cluster of {workers} worker(s) x {threads} torch thread(s)"
                     + (f", {limit / 2**30:.1f} GiB each" if limit else ""))
    except Exception as error:
        print(f"{prog}: error: cannot start or reach the dask cluster: {error}", file=sys.stderr)
        return 2
    with client:
        print(f"Running on {where}; model {model.model_type} from {model.checkpoint}.")
        if "dashboard" in client.scheduler_info().get("services", {}):
            import importlib.util

            plots = "" if importlib.util.find_spec("bokeh") else " (pip install bokeh for its plots)"
            print(f"Dashboard: {client.dashboard_link}{plots}")
        try:
            result = run(client, model)
        except ModelLoadError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        if workers is not None and client.cluster is not None:
            client.cluster.close()
    result.skipped.extend(skipped)
    for name, reason in failed.items():
        result.failed.setdefault(name, reason)
    print(("Done with errors: " if result.failed else "Done: ") + result.summary(),
          file=sys.stderr if result.failed else sys.stdout)
    return result.exit_status


def main_distributed(
    jobs: Sequence[Job], failed: dict, skipped: list, model: ModelChoice, settings: Any, fmt: Optional[str],
    existing: str, *, workers: Optional[int] = None, scheduler: Optional[str] = None,
    memory_limit: Union[str, int] = "auto", resources: Optional[dict] = None,
) -> int:
    """``napari-sam-amg --workers N`` / ``--scheduler ADDRESS`` after the CLI's checks (``failed``: file
    name -> reason of the files that could not be planned); returns the exit status."""

    def run(client: Any, model: ModelChoice) -> BatchResult:
        return run_jobs(jobs, model, settings, fmt, existing, client, resources=resources)

    return _main_on_cluster("napari-sam-amg", model, run, failed, skipped, workers=workers, scheduler=scheduler,
                            memory_limit=memory_limit, resources=resources)


def main_embed_distributed(
    plans: Sequence[tuple[Any, Path]], failed: dict, skipped: list, model: ModelChoice, options: EmbedOptions, *,
    workers: Optional[int] = None, scheduler: Optional[str] = None, memory_limit: Union[str, int] = "auto",
    resources: Optional[dict] = None, progress: bool = True,
) -> int:
    """``napari-sam-embed --workers N`` / ``--scheduler ADDRESS`` after the CLI's checks (``plans`` from
    :func:`napari_sam.embed_cli.plan_stores`, ``failed``: file name -> reason of the files that could
    not be planned); returns the exit status."""

    def run(client: Any, model: ModelChoice) -> BatchResult:
        return run_embed_plans(plans, model, options, client, progress=progress, resources=resources)

    return _main_on_cluster("napari-sam-embed", model, run, failed, skipped, workers=workers, scheduler=scheduler,
                            memory_limit=memory_limit, resources=resources)
