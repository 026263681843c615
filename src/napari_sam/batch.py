"""Batch automatic segmentation on ``dask.distributed``: one engine for ``napari-sam-amg
--workers N`` / ``--scheduler ADDRESS`` and for Python (:func:`run_batch`).

Work items are input files (a stack's planes stay one item). They are mapped over a dask
client; dask schedules them, retries the items of a worker that died on another worker, and
shows its dashboard. Each worker loads the model once, in :class:`SamWorkerPlugin` (registered
with ``client.register_plugin``): tasks carry the model *choice* (:class:`ModelChoice`: type,
checkpoint path, precision, device, torch threads) and the :class:`~napari_sam.amg_settings.AmgSettings`,
never the model. Each task runs :func:`napari_sam.cli.process_job`, the command line's per-file
code path, so outputs are byte-identical to a one-process run with the same torch threads, and
are written atomically (a killed worker leaves only a temporary sibling, removed at the end of
the run). A task never raises for a bad image: it returns a failed :class:`~napari_sam.cli.ItemResult`
with the reason, so one bad file fails alone.

``dask`` is imported only when a function here needs it (``import napari_sam.batch`` is light);
install it with ``pip install 'napari-sam[distributed]'``. See docs/batch.md.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

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
        done: the items computed (:class:`~napari_sam.cli.ItemResult`).
        skipped: names of files whose outputs were already complete, or that are not images.
        failed: file name -> reason.
    """

    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        """0, or 1 when anything failed."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """E.g. ``"8 done (123 masks), 1 skipped, 1 failed:\\n  bad.png: could not read ..."``."""
        masks = sum(item.masks for item in self.done)
        text = f"{len(self.done)} done ({masks} masks), {len(self.skipped)} skipped, {len(self.failed)} failed"
        if self.failed:
            text += ":\n" + "\n".join(f"  {name}: {reason}" for name, reason in self.failed.items())
        return text


class ModelLoadError(RuntimeError):
    """The workers could not load the model (e.g. the checkpoint is not at the same path on them)."""


# --- the worker side -----------------------------------------------------------------------------

_LOADED: dict = {}  # per worker process: (ModelChoice, settings) -> generator, kept across registrations
_LOAD_LOCK = threading.Lock()


def _generator_for(model: ModelChoice, settings: Any) -> Any:
    """The generator of a model choice in this process, built once (torch threads set first)."""
    with _LOAD_LOCK:
        key = (model, settings)
        if key not in _LOADED:
            import torch

            from .cli import load_generator

            if model.threads is not None:
                torch.set_num_threads(model.threads)
            _LOADED.clear()  # one model per worker: a new choice replaces the old one
            _LOADED[key] = load_generator(model.model_type, model.checkpoint, model.device, settings, model.precision)
        return _LOADED[key]


class _PluginState:
    """The part of :class:`SamWorkerPlugin` that needs no dask (mixed into the plugin class)."""

    name = PLUGIN_NAME
    idempotent = False

    def __init__(self, model: ModelChoice, settings: Any) -> None:
        self.model = model
        self.settings = settings
        self.generator = None
        self.lock = threading.Lock()  # one item at a time per worker, whatever its nthreads

    def setup(self, worker: Any = None) -> None:
        self.generator = _generator_for(self.model, self.settings)

    def __getstate__(self) -> dict:
        return {"model": self.model, "settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["settings"])


def _plugin_class() -> type:
    from distributed.diagnostics.plugin import WorkerPlugin

    cls = type("SamWorkerPlugin", (_PluginState, WorkerPlugin), {
        "__module__": __name__,
        "__doc__": "Loads the model of a :class:`ModelChoice` once per worker (``client.register_plugin``).",
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


def run_item(job: Job, fmt: Optional[str], existing: str) -> ItemResult:
    """One task: segment ``job`` with this worker's model and write its outputs; never raises for
    a bad file (returns a failed result with the reason)."""
    from distributed import get_worker

    from .cli import failure_reason, process_job

    plugin = get_worker().plugins[PLUGIN_NAME]
    with plugin.lock:
        if plugin.generator is None:
            plugin.setup()
        if plugin.model.threads is not None:
            import torch

            if torch.get_num_threads() != plugin.model.threads:  # e.g. something else in the worker changed it
                torch.set_num_threads(plugin.model.threads)
        try:
            return process_job(job, plugin.generator, fmt, existing, progress=False, log=lambda line: None)
        except Exception as error:
            return ItemResult(job.target.name, "failed", reason=failure_reason(error))


# --- the driver side -----------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def _progress_bar(total: int, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="napari-sam-amg", file=sys.stderr, disable=not progress)


def run_jobs(
    jobs: Sequence[Job], model: ModelChoice, settings: Any, fmt: Optional[str] = None, existing: str = "skip",
    client: Any = None, *, progress: bool = True, resources: Optional[dict] = None,
) -> BatchResult:
    """Run planned jobs (:func:`napari_sam.cli.plan_jobs`) on ``client``, or in this process when None.

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
    from .cli import failure_reason, is_complete, process_job

    result = BatchResult()
    todo = []
    for job in jobs:
        if existing == "skip" and is_complete(job):
            result.skipped.append(job.target.name)
        else:
            todo.append(job)

    def collect(item: ItemResult) -> None:
        if item.status == "failed":
            result.failed[item.name] = item.reason
        elif item.status == "skipped":
            result.skipped.append(item.name)
        else:
            result.done.append(item)

    with _progress_bar(len(todo), progress) as bar:
        if client is None:
            generator = _generator_for(model, settings) if todo else None
            for job in todo:
                try:
                    collect(process_job(job, generator, fmt, existing, progress=False, log=lambda line: None))
                except Exception as error:
                    collect(ItemResult(job.target.name, "failed", reason=failure_reason(error)))
                bar.update()
        elif todo:
            from distributed import as_completed

            plugin = __getattr__("SamWorkerPlugin")(model, settings)
            try:
                client.register_plugin(plugin, name=PLUGIN_NAME)  # every worker loads the model now
            except Exception as error:
                raise ModelLoadError(f"the dask workers could not load the model: {failure_reason(error)}") from error
            keys = [f"napari-sam-{i}-{job.target.name}" for i, job in enumerate(todo)]
            futures = client.map(run_item, todo, fmt=fmt, existing=existing, key=keys, pure=False, resources=resources)
            names = {future.key: job.target.name for future, job in zip(futures, todo)}
            for future in as_completed(futures):
                try:
                    collect(future.result())
                except Exception as error:  # e.g. KilledWorker: the file killed every worker it ran on
                    collect(ItemResult(names[future.key], "failed", reason=failure_reason(error)))
                bar.update()
            client.cancel(futures)  # release the results held by the workers
    _remove_leftovers(jobs)
    return result


def _remove_leftovers(jobs: Iterable[Job]) -> None:
    from .utils.files import remove_stale_temporaries

    for folder in {d.parent for job in jobs for d in job.destinations.values()}:
        for stale in remove_stale_temporaries(folder):
            print(f"Removed {stale.name!r}: the unfinished output of a killed worker.", file=sys.stderr)


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
    """
    from .amg_settings import AmgSettings
    from .cli import check_destinations, check_output_folder, list_targets, plan_jobs, prepare_output_folder
    from .cli import resolve_checkpoint

    output = Path(output)
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    targets = [target for path in paths for target in list_targets(Path(path))]
    if not isinstance(model, ModelChoice):
        model = ModelChoice(*resolve_checkpoint(model, None))
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


def main_distributed(
    jobs: Sequence[Job], failed: dict, skipped: list, model: ModelChoice, settings: Any, fmt: Optional[str],
    existing: str, *, workers: Optional[int] = None, scheduler: Optional[str] = None,
    memory_limit: Union[str, int] = "auto", resources: Optional[dict] = None,
) -> int:
    """``napari-sam-amg --workers N`` / ``--scheduler ADDRESS`` after the CLI's checks (``failed``: file
    name -> reason of the files that could not be planned); returns the exit status."""
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
        print(f"napari-sam-amg: error: cannot start or reach the dask cluster: {error}", file=sys.stderr)
        return 2
    with client:
        print(f"Running on {where}; model {model.model_type} from {model.checkpoint}.")
        if "dashboard" in client.scheduler_info().get("services", {}):
            import importlib.util

            plots = "" if importlib.util.find_spec("bokeh") else " (pip install bokeh for its plots)"
            print(f"Dashboard: {client.dashboard_link}{plots}")
        try:
            result = run_jobs(jobs, model, settings, fmt, existing, client, resources=resources)
        except ModelLoadError as error:
            print(f"napari-sam-amg: error: {error}", file=sys.stderr)
            return 2
        if workers is not None and client.cluster is not None:
            client.cluster.close()
    result.skipped.extend(skipped)
    for name, reason in failed.items():
        result.failed.setdefault(name, reason)
    print(("Done with errors: " if result.failed else "Done: ") + result.summary(),
          file=sys.stderr if result.failed else sys.stdout)
    return result.exit_status
