"""The training loop: :func:`train` and the optimizer step it repeats.

:func:`train` runs steps from any :class:`~napari_sam.training.data.TrainingData`, with
AdamW, linear warm-up and cosine decay, fixed seeds (the data of step ``s`` depend only on
``(seed, s)``), and a resumable training state written atomically every
``checkpoint_every`` steps (:mod:`~napari_sam.training.checkpointing`). With
``decoder_only=True`` the image encoder is frozen and each image embedding is computed once
and cached, so only the prompt encoder and mask decoder train: fast enough on a laptop CPU
for any registry model. With ``iou_head_only=True`` only the IoU prediction head trains
(:func:`~napari_sam.training.step.iou_head_step`), on the prompts of automatic mask
generation. With ``torch_compile=True`` the heavy parts of a step run through
``torch.compile`` (:class:`~napari_sam.training.step.StepFunctions`). With ``processes > 1``
the steps run data-parallel (:mod:`~napari_sam.training.parallel`).

The step itself is in :mod:`~napari_sam.training.step`, the data sources in
:mod:`~napari_sam.training.data`, the settings in :mod:`~napari_sam.training.config`, the
initialisation for training from scratch in :mod:`~napari_sam.training.initialization`.
Their public names are importable from this module too (``TrainConfig``, ``SyntheticData``,
``AnnotatedImages``, ``init_from_scratch``, ...), as the README documents.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..modeling import Sam
from ..utils.transforms import ResizeLongestSide
from .checkpointing import (
    HISTORY_FILE,
    MODEL_FILE,
    STATE_FILE,
    TrainState,
    append_history,
    load_training_state,
    save_atomic,
    save_training_state,
    truncate_history,
)
from .config import TrainConfig
from .data import AnnotatedImages, SyntheticData, TrainingData, prepare
from .initialization import TIED_CROSS_ATTENTION_GAIN, init_from_scratch
from .parallel import Replica, run_data_parallel
from .step import StepFunctions, StepResult, autocast, iou_head_step, training_step

__all__ = [
    "TIED_CROSS_ATTENTION_GAIN",
    "AnnotatedImages",
    "StepFunctions",
    "StepResult",
    "SyntheticData",
    "TrainConfig",
    "TrainState",
    "TrainingData",
    "autocast",
    "init_from_scratch",
    "iou_head_step",
    "optimization_step",
    "prepare",
    "step_loss",
    "train",
    "training_step",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(
    model: Sam, data: TrainingData, config: TrainConfig, out_dir: PathLike,
    progress: Optional[Callable[[int, int, StepResult], None]] = None,
    log_every: int = 10,
) -> Sam:
    """Train ``model`` in place; resumable.

    Writes ``<out_dir>/training_state.pt`` (model, optimizer, step, history, config) every
    ``config.checkpoint_every`` steps and at the end, ``<out_dir>/model.pth`` (a plain SAM
    state dict that ``sam_model_registry[type](checkpoint=...)`` and ``build_sam`` load)
    at the end, and ``<out_dir>/history.jsonl`` (one line of losses per logged step). All
    writes are atomic (temporary file, then rename). A run started again with the same
    ``out_dir`` continues from the last training state, with the same data it would have
    seen.

    Args:
        model: SAM to train (any registry type); its device is used.
        data: a :class:`TrainingData` (e.g. :class:`SyntheticData`, :class:`AnnotatedImages`).
        config: run settings.
        out_dir: folder for checkpoints (created).
        progress: called as ``progress(step, total_steps, result)`` after every step.
        log_every: steps between lines in ``history.jsonl`` and the log.

    Returns:
        The trained model (the same object), in eval mode.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    if config.decoder_only:
        model.image_encoder.requires_grad_(False)
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    if config.iou_head_only:
        model.requires_grad_(False)
        model.mask_decoder.iou_prediction_head.requires_grad_(True)
    try:
        if config.processes > 1:
            run_data_parallel(model, data, config, out, progress, log_every, _run_steps)
        else:
            _run_steps(model, data, config, out, progress, log_every)
    finally:  # give the caller's trainable flags back, also after an error or Ctrl-C
        if config.iou_head_only:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(trainable_before[name])
    model.eval()
    save_atomic(model.state_dict(), out / MODEL_FILE)
    return model


def _run_steps(
    model: Sam, data: TrainingData, config: TrainConfig, out: Path,
    progress: Optional[Callable[[int, int, StepResult], None]], log_every: int,
    replica: Replica = Replica(),
) -> None:
    """The optimisation loop of :func:`train`, over the parameters that require gradients:
    resumes from ``out/training_state.pt`` when it exists, writes the history and the
    training states (``replica`` 0 only); the caller sets which parameters train and
    writes ``model.pth``. Data-parallel replicas run it too (``RunSteps`` of
    :func:`~napari_sam.training.parallel.run_data_parallel`)."""
    state_path = out / STATE_FILE
    history_path = out / HISTORY_FILE
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    state = TrainState()
    if state_path.exists():
        state, saved_config = load_training_state(state_path, model, optimizer)
        if saved_config.get("processes", 1) != config.processes:
            raise ValueError(
                f"{state_path} was written by a run with processes={saved_config.get('processes', 1)}; "
                f"resume it with the same number of processes (got {config.processes})."
            )
        if not replica.writes:
            state.history = []
        _logger.info("Resuming from step %d of %d (%s).", state.step, config.steps, state_path)
        if saved_config.get("steps", config.steps) != config.steps:
            _logger.warning(
                "The saved run was set up for %s steps, this one for %d: the learning-rate schedule "
                "changes, so the result differs from a run started with %d steps.",
                saved_config["steps"], config.steps, config.steps,
            )
        # history.jsonl may hold steps logged after the saved state: drop them, they rerun.
        if replica.writes:
            truncate_history(history_path, state.step)
    embedding_cache: dict[int, torch.Tensor] = {}
    model.train()
    if config.decoder_only:
        model.image_encoder.eval()
    started = time.perf_counter()
    functions = StepFunctions.for_model(model, compiled=config.torch_compile and not config.iou_head_only)
    for step in range(state.step, config.steps):
        result = optimization_step(model, optimizer, data, config, step, functions, embedding_cache, replica)
        done = step + 1
        checkpoint = done % config.checkpoint_every == 0 or done == config.steps
        if checkpoint:
            replica.check_in_sync(model, done)
        if not replica.writes:
            continue
        if progress is not None:
            progress(done, config.steps, result)
        if done % log_every == 0 or done == config.steps:
            record = {"step": done, "seconds": round(time.perf_counter() - started, 1), **asdict(result)}
            state.history.append(record)
            append_history(history_path, record)
            _logger.info("step %d/%d loss %.4f last-round IoU %.3f", done, config.steps, result.loss,
                         result.last_round_iou)
        if checkpoint:
            state.step = done
            save_training_state(state_path, model, optimizer, state, config)


def optimization_step(
    model: Sam, optimizer: torch.optim.Optimizer, data: TrainingData, config: TrainConfig, step: int,
    functions: StepFunctions, embedding_cache: Optional[dict[int, torch.Tensor]] = None,
    replica: Replica = Replica(),
) -> StepResult:
    """Step ``step`` of a run: its batch and prompts, the loss, one clipped optimizer update.

    The batch is ``data.batch(step, config.images_per_step)``; prompts come from a generator
    seeded with ``(config.seed, step)``; the learning rate follows ``config``'s warm-up and
    cosine schedule. :func:`train` runs it for every step.
    In a data-parallel run (``replica.world > 1``) the process takes its share of the batch
    and its own prompt seed (:class:`~napari_sam.training.parallel.Replica`), weights its
    loss by its share of the step's objects and sums the gradients over the processes
    before clipping, so all of them make the same update.

    Args:
        model: the SAM being trained (in train mode).
        optimizer: optimizer over the trainable parameters (gradients clipped to norm 1).
        data: source of (image, labels) pairs.
        config: run settings (``decoder_only`` and ``iou_head_only`` choose the step kind).
        step: 0-based step index.
        functions: the encoder, decoder and loss to run (:meth:`StepFunctions.for_model`).
        embedding_cache: image embeddings by image identity, filled and reused when
            ``config.decoder_only``.
        replica: this process's place in a data-parallel run (default: the only one).

    Returns:
        The step's :class:`StepResult` (over all processes); no update when no object was
        prompted.
    """
    for group in optimizer.param_groups:
        group["lr"] = _learning_rate(config, step)
    loss, result = step_loss(model, data, config, step, functions, embedding_cache, replica)
    optimizer.zero_grad(set_to_none=True)
    total = replica.total_objects(result.objects)
    if total:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if result.objects:
            (loss if replica.world == 1 else loss * (result.objects / total)).backward()
        replica.sum_gradients(parameters)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
    return replica.combine(result)


def step_loss(
    model: Sam, data: TrainingData, config: TrainConfig, step: int, functions: StepFunctions,
    embedding_cache: Optional[dict[int, torch.Tensor]] = None, replica: Replica = Replica(),
) -> tuple[torch.Tensor, StepResult]:
    """The forward pass of :func:`optimization_step`: this process's share of batch ``step``,
    its prompts and its loss (:func:`training_step` or, with ``config.iou_head_only``,
    :func:`iou_head_step`), with no update and no communication between processes.

    Returns:
        (scalar loss tensor, this share's :class:`StepResult`).
    """
    side = model.image_encoder.img_size
    generator = torch.Generator().manual_seed(replica.prompt_seed(config.seed, step))
    pairs = replica.batch(data, step, config.images_per_step)
    prepared = [prepare(model, image, labels) for image, labels in pairs]
    inputs = torch.stack([p[0] for p in prepared])
    first_prompt = "point" if torch.rand((), generator=generator) < 0.5 else "box"
    with autocast(model, config.precision):
        extents = [ResizeLongestSide.get_preprocess_shape(*image.shape[:2], side) for image, _ in pairs]
        if config.iou_head_only:
            with torch.no_grad():
                embeddings = model.image_encoder(inputs)
            loss, result = iou_head_step(model, embeddings, [p[1] for p in prepared], extents, config, generator)
        else:
            if config.decoder_only:
                embeddings = _cached_embeddings(model, inputs, {} if embedding_cache is None else embedding_cache)
            else:
                embeddings = functions.encode(inputs)
            loss, result = training_step(
                model, embeddings, [p[1] for p in prepared], config, generator, first_prompt, extents, functions
            )
    return loss, result


def _cached_embeddings(model: Sam, inputs: torch.Tensor, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """Image embeddings of a frozen encoder, computed once per distinct input image."""
    out = []
    with torch.no_grad():
        for image in inputs:
            key = hash(image.cpu().numpy().tobytes())
            if key not in cache:
                cache[key] = model.image_encoder(image[None]).float()[0]
            out.append(cache[key])
    return torch.stack(out)
