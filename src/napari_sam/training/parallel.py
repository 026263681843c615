"""Data-parallel training over worker processes on one CPU machine (``TrainConfig.processes``).

A small model's operations are too short to keep many threads busy, so on a machine with
many cores several processes that each take part of every batch can train faster than one
process with all the threads. With few cores the gain is small (``TrainConfig.processes``).

Each process (a *replica*) holds a full copy of the model and optimizer. Per step, replica
``r`` of ``n`` takes images ``r, r + n, ...`` of the step's batch, draws its own prompts, and
back-propagates its loss weighted by its share of the step's prompted objects; the
gradients are summed over the replicas (``torch.distributed`` all-reduce, gloo backend over
127.0.0.1), so every replica applies the same update: the object-weighted mean gradient of
the whole batch, as one process computes it. Replica 0 is the calling process: it keeps
the progress callback, writes the checkpoints and the history, and its model is the
result. The others are started with the ``spawn`` method and exit when the run ends.

This module runs any step loop it is given (``run_steps``, the trainer's) and does not
import the trainer: the loop reaches the spawned replicas pickled by reference.
"""

from __future__ import annotations

import copy
import io
import logging
import multiprocessing
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..modeling import Sam
from .config import TrainConfig
from .data import TrainingData
from .step import StepResult

_logger = logging.getLogger(__name__)

# A collective waits this long for the other replicas: the first steps of a compiled run
# compile kernels for minutes. A replica that dies closes its sockets, which ends the wait
# at once.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Replica:
    """One of ``world`` processes of a data-parallel run (``world == 1``: a plain run).

    Attributes:
        rank: this process's index, 0 to ``world - 1``; 0 writes checkpoints and logs.
        world: number of processes.
    """

    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        """Whether this replica writes the checkpoints, the history and the log (rank 0)."""
        return self.rank == 0

    def batch(self, data: TrainingData, step: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """This replica's share of batch ``step``: images ``rank, rank + world, ...`` of the
        ``count`` that ``data.batch(step, count)`` gives (through ``data.items(step, indices)``
        when the source has it, so that only the share is made)."""
        if self.world == 1:
            return data.batch(step, count)
        indices = range(self.rank, count, self.world)
        items = getattr(data, "items", None)
        if items is not None:
            return items(step, indices)
        whole = data.batch(step, count)
        return [whole[i] for i in indices]

    def prompt_seed(self, seed: int, step: int) -> int:
        """Seed of the prompt generator of ``step``: rank 0 keeps a plain run's seed, so a
        1-process run draws the prompts it always drew; the others draw independent ones."""
        if self.rank == 0:
            return seed * 1_000_003 + step
        return int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1, np.uint64)[0] >> 1)

    def total_objects(self, objects: int) -> int:
        """Prompted objects of the whole step, summed over the replicas."""
        if self.world == 1:
            return objects
        count = torch.tensor([objects], dtype=torch.int64)
        dist.all_reduce(count)
        return int(count)

    def sum_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Replace every parameter's gradient by its sum over the replicas (one all-reduce of
        the flattened gradients; a missing gradient counts as zeros)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            # for float32 parameters the gradients are views of the one summed buffer (no copy)
            parameter.grad = flat[offset:offset + size].view_as(parameter).to(parameter.dtype)
            offset += size

    def combine(self, result: StepResult) -> StepResult:
        """The step's :class:`StepResult` over all replicas: losses and last-round IoU are
        means weighted by each replica's objects; ``objects`` is the sum."""
        if self.world == 1:
            return result
        n = result.objects
        values = [result.loss, result.mask_loss, result.iou_loss, result.last_round_iou if n else 0.0]
        sums = torch.tensor([v * n for v in values] + [n], dtype=torch.float64)
        dist.all_reduce(sums)
        total = int(sums[-1])
        if total == 0:
            return StepResult(0.0, 0.0, 0.0, float("nan"), 0)
        loss, mask, iou, last = (float(v) / total for v in sums[:-1])
        return StepResult(loss, mask, iou, last, total)

    def check_in_sync(self, model: torch.nn.Module, step: int) -> None:
        """Raise RuntimeError unless every replica's weights agree (compares a float64
        fingerprint of the parameters; called at each checkpoint)."""
        if self.world == 1:
            return
        with torch.no_grad():
            mine = torch.stack([
                sum((p.double().sum() for p in model.parameters()), torch.zeros((), dtype=torch.float64)),
                sum((p.double().abs().sum() for p in model.parameters()), torch.zeros((), dtype=torch.float64)),
            ])
        everyone = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        if any(not torch.equal(other, everyone[0]) for other in everyone):
            raise RuntimeError(f"Data-parallel replicas disagree on the weights at step {step}: {everyone}.")


# The step loop each replica runs, called as
# run_steps(model, data, config, out, progress, log_every, replica).
RunSteps = Callable[[Sam, TrainingData, TrainConfig, Path, Optional[Callable[[int, int, StepResult], None]], int,
                     Replica], None]


def run_data_parallel(
    model: Sam, data: TrainingData, config: TrainConfig, out: Path,
    progress: Optional[Callable[[int, int, StepResult], None]], log_every: int, run_steps: RunSteps,
) -> None:
    """Run ``run_steps`` (the trainer's step loop) as ``config.processes`` replicas.

    The calling process is replica 0 and trains ``model`` in place; the others start from a
    copy of it. The torch threads of the caller (``torch.get_num_threads()``) are divided
    among the replicas (at least 1 each) and given back afterwards. ``run_steps`` must be a
    module-level function: the spawned replicas receive it pickled by reference.

    Raises:
        ValueError: the model is not on the CPU, or the batch has fewer images than
            processes.
        RuntimeError: a ``torch.distributed`` process group already exists in this
            process, a replica failed, or the replicas' weights diverged.
    """
    world = config.processes
    if model.device.type != "cpu":
        raise ValueError(f"processes={world} trains on the CPU; the model is on {model.device}.")
    if config.images_per_step < world:
        raise ValueError(
            f"processes={world} needs at least as many images per step; got images_per_step={config.images_per_step}."
        )
    if dist.is_initialized():
        raise RuntimeError(
            "A torch.distributed process group already exists in this process; data-parallel training "
            "(processes > 1) starts its own, so run it in a process without one."
        )
    threads_before = torch.get_num_threads()
    threads = max(1, threads_before // world)
    skeleton, weights = _model_parts(model)
    address = f"tcp://127.0.0.1:{_free_port()}"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_replica_main, name=f"napari-sam-replica-{rank}",
            args=(rank, world, address, threads, skeleton, weights, data, config, str(out), log_every, run_steps),
        )
        for rank in range(1, world)
    ]
    for worker in workers:
        worker.start()
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=address, rank=0, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        try:
            run_steps(model, data, config, out, progress, log_every, Replica(0, world))
        finally:
            dist.destroy_process_group()
        for worker in workers:
            worker.join()
        failed = [w.name for w in workers if w.exitcode != 0]
        if failed:
            raise RuntimeError(f"Data-parallel replica(s) {', '.join(failed)} failed; see their error above.")
    finally:
        torch.set_num_threads(threads_before)
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()


def _model_tensors(model: Sam) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name (non-persistent buffers included)."""
    return dict((*model.named_parameters(), *model.named_buffers()))


def _model_parts(model: Sam) -> tuple[Sam, bytes]:
    """The model as (a copy without weights, its tensors as ``torch.save`` bytes) for a replica.

    The copy's parameters and buffers are empty, so the spawn pickle carries the module
    structure only (never a tensor shared with this process); the tensors travel as a plain
    name -> tensor dict that the replica reads with ``torch.load(weights_only=True)``.
    """
    buffer = io.BytesIO()
    torch.save({name: tensor.detach() for name, tensor in _model_tensors(model).items()}, buffer)
    skeleton = copy.deepcopy(model)
    for tensor in _model_tensors(skeleton).values():
        tensor.data = torch.empty(0, dtype=tensor.dtype)
    return skeleton, buffer.getvalue()


def _replica_main(
    rank: int, world: int, address: str, threads: int, skeleton: Sam, weights: bytes, data: TrainingData,
    config: TrainConfig, out: str, log_every: int, run_steps: RunSteps,
) -> None:
    """Entry point of replica ``rank`` > 0 (a spawned process)."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    tensors = torch.load(io.BytesIO(weights), weights_only=True)
    for name, tensor in _model_tensors(skeleton).items():
        tensor.data = tensors[name]
    model = skeleton
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        run_steps(model, data, config, Path(out), None, log_every, Replica(rank, world))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
