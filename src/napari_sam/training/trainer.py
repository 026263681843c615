"""Training and fine-tuning loops for SAM with simulated interactive prompts.

One step (:func:`training_step`) follows SAM's recipe (Kirillov et al. 2023, appendix A):
encode a batch of images, pick up to ``objects_per_image`` ground-truth objects per image,
give each a first prompt (a uniformly drawn positive point or a noisy box, equally
likely, the same kind for the whole step), predict, then add ``iterations - 1``
corrective points drawn from the error region, each time feeding the previous low-res
logits back as the mask prompt. The loss of every round is 20 x focal + dice on the
masks (upsampled to the input frame) plus the MSE of the predicted IoU; for a single
point the best of the three multimask outputs is back-propagated (see ``losses``).
Optionally (``TrainConfig.distractor_probability``, not in SAM's recipe) a point-prompted
step adds a negative point on another object, as users click to separate neighbours.

:func:`train` runs steps from any :class:`TrainingData`, with AdamW, linear warm-up and
cosine decay, fixed seeds (the data of step ``s`` depend only on ``(seed, s)``), and a
resumable training state written atomically every ``checkpoint_every`` steps. With
``decoder_only=True`` the image encoder is frozen and each image embedding is computed
once and cached, so only the prompt encoder and mask decoder train: fast enough on a
laptop CPU for any registry model. With ``iou_head_only=True`` only the IoU prediction head
trains (:func:`iou_head_step`), on the prompts of automatic mask generation. With
``torch_compile=True`` the heavy parts of a step run through ``torch.compile``
(:class:`StepFunctions`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling import Sam
from ..utils.image import to_rgb_uint8
from ..utils.transforms import ResizeLongestSide
from .losses import best_object_iou, mask_iou, mask_loss
from .parallel import Replica, run_data_parallel
from .prompts import corrective_points, noisy_boxes, sample_points_in
from .synthetic import SHAPES, synthetic_image

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class TrainConfig:
    """Settings of a training run (stored in its checkpoints).

    Attributes:
        steps: optimizer steps in the run.
        images_per_step: images per batch.
        objects_per_image: most objects prompted per image (chosen at random).
        iterations: prompt rounds per object: the first prompt, then corrective points.
        lr: peak learning rate (AdamW), reached after ``warmup_steps``, then cosine decay to 0.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length.
        decoder_only: freeze the image encoder and cache image embeddings.
        precision: "fp32" or "bf16" (autocast for the forward pass).
        seed: seed of data, prompts and initial weights.
        checkpoint_every: steps between resumable training states.
        min_object_area: objects smaller than this (pixels, in the input frame) are not prompted.
        augment: random flips and 90-degree rotations of annotated images.
        distractor_probability: chance that a step whose first prompt is a point adds a
            second, negative point on another object of the image (on the background where
            the image has no other object). Not in SAM's recipe, whose negative points come
            only from the error region: it teaches the model that a negative click on a
            neighbour does not cut the object. 0 draws nothing (the recipe's stream).
        iou_head_only: calibrate the IoU prediction head alone (every other weight frozen,
            so the masks do not change) on the prompts of automatic mask generation:
            ``objects_per_image`` positive points per image drawn uniformly over the image
            (background included, as a point grid falls), all four outputs, each trained
            towards the best IoU of its mask with any ground-truth object of the image (0
            where the image has none). Not in SAM's recipe, whose IoU targets come only from
            points on objects: a small model trained that way ranks its masks poorly where
            points fall off objects (see :func:`iou_head_step`). ``iterations`` is ignored.
        torch_compile: run the image encoder, the mask decoder and the mask loss of
            :func:`training_step` through ``torch.compile`` (:class:`StepFunctions`; needs
            a C++ compiler on CPU). The first steps take about two minutes longer while the
            kernels are compiled; after that a ``vit_small`` step with bf16 on 2 CPU cores
            takes 0.93 of the eager time from the shipped weights with torch 2.14
            (``benchmarks/bench_training_step.py``: 2.20 s against 2.37 s; 0.80 with the
            earlier torch and the encoder's former dense attention bias). Losses and
            weights agree with an eager run's to rounding error, not to the bit. The
            IoU-head calibration (``iou_head_only``) always runs eagerly.
        corrective_fraction: share of each step's prompted objects (drawn at random, at
            least one) that go on to the corrective rounds after the first prompt. 1 (the
            recipe) corrects every object; less makes a step cheaper, since the mask decoder
            runs once per object and round.
        processes: data-parallel processes on this machine (CPU only; see
            :mod:`~napari_sam.training.parallel`). Each takes ``images_per_step / processes``
            images of every batch and draws its own prompts; the gradients are combined so
            that every process applies the object-weighted mean gradient of the whole
            batch. The caller's torch threads are divided among the processes. On 2 CPU
            cores, 2 processes of 1 thread gain little on ``vit_small`` (eager: 0.94 of the
            step time of 1 process with 2 threads; compiled: 1.4 times slower than 1
            compiled process; ``benchmarks/bench_data_parallel.py``): the two halves of a
            batch seldom hold as many objects, and the processes share the memory
            bandwidth. It is meant for machines with more cores than one process keeps
            busy. A run's prompts, and so its weights, differ from a 1-process run's; a
            resumed run continues with the same number of processes.

    Raises:
        ValueError: a setting out of range (``corrective_fraction`` outside (0, 1],
            ``distractor_probability`` outside [0, 1], a count of steps, images, objects,
            rounds or processes below 1, a negative ``warmup_steps``, a ``lr`` not above
            0, an unknown ``precision``), also when made by ``dataclasses.replace``. The
            message starts with the setting's name.
    """

    steps: int = 1000
    images_per_step: int = 4
    objects_per_image: int = 8
    iterations: int = 3
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    decoder_only: bool = False
    precision: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 50
    min_object_area: int = 16
    augment: bool = True
    distractor_probability: float = 0.0
    iou_head_only: bool = False
    torch_compile: bool = False
    processes: int = 1
    corrective_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.corrective_fraction <= 1.0:
            raise ValueError(f"corrective_fraction must be in (0, 1], got {self.corrective_fraction}.")
        if not 0.0 <= self.distractor_probability <= 1.0:
            raise ValueError(f"distractor_probability must be between 0 and 1, got {self.distractor_probability}.")
        for name in ("steps", "images_per_step", "objects_per_image", "iterations", "processes", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}.")


@dataclass(frozen=True)
class StepFunctions:
    """The three heavy callables of a training step, eager or compiled by ``torch.compile``.

    Attributes:
        encode: BxCxSxS preprocessed images -> image embeddings (the image encoder).
        predict_masks: the mask decoder's ``predict_masks`` (all four outputs).
        mask_loss: :func:`~napari_sam.training.losses.mask_loss`.
    """

    encode: Callable[[torch.Tensor], torch.Tensor]
    predict_masks: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    mask_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @classmethod
    def for_model(cls, model: Sam, compiled: bool = False) -> "StepFunctions":
        """The model's own modules (``compiled=False``) or their ``torch.compile`` versions.

        Compiling returns wrappers and leaves ``model`` and its state dict unchanged. The
        number of prompted objects and of points changes from step to step: torch.compile's
        automatic dynamic shapes compile the decoder and the loss once for the first shapes
        and once more, with those sizes symbolic, when they first change. (Marking every
        size dynamic up front, ``dynamic=True``, fails in the default backend's code
        generation with torch 2.14.) Compilation itself happens at the first calls (minutes
        on CPU; it needs a C++ compiler).

        Args:
            model: the SAM whose modules are used.
            compiled: wrap them in ``torch.compile`` (default backend).

        Returns:
            A :class:`StepFunctions`.
        """
        if not compiled:
            return cls(model.image_encoder, model.mask_decoder.predict_masks, mask_loss)
        return cls(
            torch.compile(model.image_encoder),
            torch.compile(model.mask_decoder.predict_masks),
            torch.compile(mask_loss),
        )


class TrainingData(Protocol):
    """A source of (image, labels) pairs: ``batch(step, count)`` must depend only on its arguments.

    A source may also offer ``items(step, indices)``: the pairs at ``indices`` of
    ``batch(step, count)``, made without the others (data-parallel processes use it).
    """

    def batch(self, step: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class SyntheticData:
    """Endless synthetic images (:func:`~napari_sam.training.synthetic.synthetic_image`).

    Attributes:
        seed: seed of the stream; image ``i`` of step ``s`` depends only on (seed, s, i).
        kind: draw only this kind (see :mod:`~napari_sam.training.synthetic`).
        kind_weights: relative frequency of each kind, e.g. ``{"shapes": 2, "nuclei": 1,
            "cells": 1}`` (drawn per image from its own seed); ignored when ``kind`` is
            given. Default: the generator's own uniform choice among its training kinds.
        occlusion_probability: chance that an image's objects may overlap (a later one
            covering an earlier one); otherwise they only touch (``synthetic_image(...,
            occlusion=False)``). Drawn per image from its own seed; at 1.0 (the default)
            nothing is drawn, so the stream is the one from before this option existed.
        shapes: shape names that images of the "shapes" kind draw from, e.g. ``("star",
            "crescent", "ellipse")``, those of the held-out sets (default: all four). It
            needs ``kind="shapes"`` or ``kind_weights``, since otherwise the kind is drawn
            inside :func:`~napari_sam.training.synthetic.synthetic_image`. Image ``i``
            of step ``s`` still depends only on (seed, s, i).

    Raises:
        ValueError: ``shapes`` with an unknown name, or without ``kind`` or ``kind_weights``.
    """

    seed: int = 0
    kind: Optional[str] = None
    kind_weights: Optional[dict[str, float]] = None
    occlusion_probability: float = 1.0
    shapes: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.shapes is None:
            return
        unknown = sorted(set(self.shapes) - set(SHAPES))
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be a non-empty choice of {sorted(SHAPES)}, got {self.shapes!r}.")
        if self.kind is None and not self.kind_weights:
            raise ValueError("shapes needs kind='shapes' or kind_weights: otherwise the kind is drawn inside "
                             "synthetic_image and the shapes cannot be applied.")

    def batch(self, step: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.items(step, range(count))

    def items(self, step: int, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The images at ``indices`` of batch ``step`` (image ``i`` depends only on ``(seed, step, i)``)."""
        out = []
        for i in indices:
            kind = self.kind
            if kind is None and self.kind_weights:
                names = sorted(self.kind_weights)
                weights = np.array([self.kind_weights[n] for n in names], dtype=float)
                chooser = np.random.default_rng([self.seed, step, i, 1])
                kind = names[int(chooser.choice(len(names), p=weights / weights.sum()))]
            occlusion = True
            if self.occlusion_probability < 1.0:
                occlusion = bool(np.random.default_rng([self.seed, step, i, 2]).random() < self.occlusion_probability)
            shapes = self.shapes if kind == "shapes" else None
            sample = synthetic_image(
                np.random.default_rng([self.seed, step, i]), kind=kind, occlusion=occlusion, shapes=shapes
            )
            out.append((sample.image, sample.labels))
        return out


@dataclass
class AnnotatedImages:
    """A user's images with instance label images (as napari Labels layers hold them).

    Args:
        images: HxW, HxWxC (C = 1, 3, 4) arrays of any real dtype (converted as
            ``SamPredictor.set_image`` converts them: contrast limits or robust percentiles).
        labels: HxW integer label images, 0 = background, one id per object.
        seed: seed of the image choice and augmentation.
        augment: random flips and 90-degree rotations.

    Raises:
        ValueError: different counts, no images, or a label image whose shape is not the
            image's first two dimensions.
    """

    images: Sequence[np.ndarray]
    labels: Sequence[np.ndarray]
    seed: int = 0
    augment: bool = True

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or not self.images:
            raise ValueError(
                f"Expected as many label images as images (at least one); got {len(self.images)} images "
                f"and {len(self.labels)} label images."
            )
        for i, (image, labels) in enumerate(zip(self.images, self.labels)):
            if np.shape(labels) != np.shape(image)[:2] or np.asarray(labels).dtype.kind not in "iub":
                raise ValueError(
                    f"Label image {i} must be an integer HxW array matching image {i}'s first two dimensions "
                    f"{np.shape(image)[:2]}; got {np.asarray(labels).dtype} {np.shape(labels)}."
                )

    def batch(self, step: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([self.seed, step])
        out = []
        for index in rng.integers(0, len(self.images), count):
            image, labels = np.asarray(self.images[index]), np.asarray(self.labels[index])
            if self.augment:
                turns = int(rng.integers(4))
                image, labels = np.rot90(image, turns, (0, 1)), np.rot90(labels, turns, (0, 1))
                if rng.random() < 0.5:
                    image, labels = image[:, ::-1], labels[:, ::-1]
            out.append((image, labels))
        return out


def prepare(model: Sam, image: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input and label image in the model's input frame.

    Returns:
        (3xSxS float32 normalised, padded image; SxS int64 labels, 0 in the padding),
        S = ``model.image_encoder.img_size``.
    """
    side = model.image_encoder.img_size
    rgb = to_rgb_uint8(image)
    transform = ResizeLongestSide(side)
    resized = transform.apply_image(rgb)
    tensor = torch.as_tensor(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
    h, w = resized.shape[:2]
    # nearest-neighbour resize of the labels to the same h x w
    rows = np.minimum((np.arange(h) + 0.5) * labels.shape[0] / h, labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * labels.shape[1] / w, labels.shape[1] - 1).astype(int)
    small = np.asarray(labels)[rows][:, cols].astype(np.int64)
    padded = torch.zeros((side, side), dtype=torch.int64)
    padded[:h, :w] = torch.from_numpy(small)
    return model.preprocess(tensor.to(model.device)), padded


def _pick_objects(
    labels: torch.Tensor, count: int, min_area: int, generator: torch.Generator,
) -> torch.Tensor:
    """KxSxS bool masks of up to ``count`` random objects of at least ``min_area`` pixels."""
    ids, areas = torch.unique(labels, return_counts=True)
    ids = ids[(ids > 0) & (areas >= min_area)]
    if len(ids) == 0:
        return torch.zeros((0, *labels.shape), dtype=torch.bool)
    chosen = ids[torch.randperm(len(ids), generator=generator)[:count]]
    return labels.unsqueeze(0) == chosen[:, None, None]


@dataclass
class StepResult:
    """Losses of one step (floats) and the mean IoU of the last round's masks."""

    loss: float
    mask_loss: float
    iou_loss: float
    last_round_iou: float
    objects: int


def autocast(model: Sam, precision: str) -> contextlib.AbstractContextManager:
    """Context for the forward pass: nothing for "fp32", bfloat16 autocast on the model's
    device type for "bf16" (weights and optimizer state stay float32).

    Raises:
        ValueError: another precision name.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(model.device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}.")


def training_step(
    model: Sam, embeddings: torch.Tensor, labels: Sequence[torch.Tensor], config: TrainConfig,
    generator: torch.Generator, first_prompt: str, extents: Optional[Sequence[tuple[int, int]]] = None,
    functions: Optional[StepFunctions] = None,
) -> tuple[torch.Tensor, StepResult]:
    """Loss of one batch with simulated interactive prompts (see the module docstring).

    Args:
        model: the SAM being trained.
        embeddings: BxCxhxw image embeddings of the batch (with gradient unless decoder-only).
        labels: B label images in the input frame (SxS int64).
        config: run settings.
        generator: torch random generator for object choice and prompts.
        first_prompt: "point" or "box".
        extents: B (height, width) of each resized image inside the SxS input. Only the
            distractor of an image with no other object uses it, to stay off the padding;
            without it that distractor may land anywhere off the object.
        functions: the decoder and loss to run (default: the model's own, eager).

    Returns:
        (scalar loss tensor, :class:`StepResult`).
    """
    functions = functions or StepFunctions.for_model(model)
    side = model.image_encoder.img_size
    masks, owner = [], []
    for b, label_image in enumerate(labels):
        picked = _pick_objects(label_image, config.objects_per_image, config.min_object_area, generator)
        masks.append(picked)
        owner += [b] * len(picked)
    if not owner:
        zero = embeddings.sum() * 0.0
        return zero, StepResult(0.0, 0.0, 0.0, float("nan"), 0)
    target = torch.cat(masks).to(model.device)
    object_embeddings = embeddings[torch.tensor(owner, device=embeddings.device)]
    image_pe = model.prompt_encoder.get_dense_pe()
    count = len(target)

    points = sample_points_in(target.cpu(), generator).unsqueeze(1)
    point_labels = torch.ones((count, 1))
    boxes = None
    if first_prompt == "box":
        boxes = noisy_boxes(target.cpu(), generator, side)
        points, point_labels = torch.zeros((count, 0, 2)), torch.zeros((count, 0))
    elif config.distractor_probability > 0 and torch.rand((), generator=generator) < config.distractor_probability:
        elsewhere = torch.stack([labels[b].cpu() > 0 for b in owner]) & ~target.cpu()
        nothing_else = ~elsewhere.flatten(1).any(1)
        for i in torch.nonzero(nothing_else).flatten().tolist():  # the image's background instead
            elsewhere[i] = ~target[i].cpu()
            if extents is not None:
                height, width = extents[owner[i]]
                elsewhere[i, height:] = False
                elsewhere[i, :, width:] = False
        points = torch.cat([points, sample_points_in(elsewhere, generator).unsqueeze(1)], 1)
        point_labels = torch.cat([point_labels, torch.zeros((count, 1))], 1)
    previous = None
    total_mask, total_iou = 0.0, 0.0
    last_iou = torch.zeros(())
    for round_index in range(config.iterations):
        ambiguous = boxes is None and points.shape[1] == 1
        sparse, dense = model.prompt_encoder(
            points=(points.to(model.device), point_labels.to(model.device)) if points.shape[1] else None,
            boxes=boxes.to(model.device) if boxes is not None else None,
            masks=previous,
        )
        logits, iou_pred = functions.predict_masks(object_embeddings, image_pe, sparse, dense)
        outputs = slice(1, None) if ambiguous else slice(0, 1)
        low_res = logits[:, outputs].float()
        iou_pred = iou_pred[:, outputs].float()
        upscaled = F.interpolate(low_res, (side, side), mode="bilinear", align_corners=False)
        losses = functions.mask_loss(upscaled, target)
        actual = mask_iou(upscaled, target)
        best = losses.argmin(1)
        rows = torch.arange(count, device=losses.device)
        total_mask = total_mask + losses[rows, best].mean()
        total_iou = total_iou + F.mse_loss(iou_pred, actual)
        last_iou = actual[rows, best]
        if round_index + 1 < config.iterations:
            previous = low_res[rows, best].unsqueeze(1).detach()
            predicted = (upscaled[rows, best] > 0).detach().cpu()
            if round_index == 0 and config.corrective_fraction < 1.0:
                keep = torch.randperm(count, generator=generator)[:max(1, round(config.corrective_fraction * count))]
                keep = keep.sort().values
                count = len(keep)
                target, object_embeddings, previous = target[keep], object_embeddings[keep], previous[keep]
                predicted, points, point_labels = predicted[keep], points[keep], point_labels[keep]
                if boxes is not None:
                    boxes = boxes[keep]
            new_points, new_labels = corrective_points(predicted, target.cpu(), generator)
            points = torch.cat([points, new_points.unsqueeze(1)], 1)
            point_labels = torch.cat([point_labels, new_labels.unsqueeze(1)], 1)
    loss = (total_mask + total_iou) / config.iterations
    result = StepResult(
        float(loss.detach()), float(total_mask.detach()) / config.iterations, float(total_iou.detach()) / config.iterations,
        float(last_iou.mean()), len(owner),
    )
    return loss, result


def iou_head_step(
    model: Sam, embeddings: torch.Tensor, labels: Sequence[torch.Tensor], extents: Sequence[tuple[int, int]],
    config: TrainConfig, generator: torch.Generator,
) -> tuple[torch.Tensor, StepResult]:
    """Loss of the IoU-head calibration (``TrainConfig.iou_head_only``) on one batch.

    Per image, ``config.objects_per_image`` single positive points are drawn uniformly from
    the image (``extents``, not the padding), as automatic mask generation prompts a grid
    that falls on objects and background alike. Each of the four mask outputs is
    thresholded at 0 in the input frame (cropped to the image, as the predictor crops), and
    its target is the best IoU with any ground-truth object of the image: the quality of the
    mask as an object mask, whatever the point landed on. The loss is the MSE between the
    predicted and the target IoU; only the IoU head gets gradients (the caller freezes the
    rest).

    Args:
        model: the SAM being calibrated.
        embeddings: BxCxhxw image embeddings (no gradient needed).
        labels: B label images in the input frame (SxS int64, 0 = background and padding).
        extents: B (height, width) of the resized image inside the SxS input.
        config: run settings.
        generator: torch random generator of the points.

    Returns:
        (scalar loss tensor, :class:`StepResult` whose ``last_round_iou`` is the mean target).
    """
    side = model.image_encoder.img_size
    image_pe = model.prompt_encoder.get_dense_pe()
    count = config.objects_per_image
    predicted, targets = [], []
    for b, (label_image, (height, width)) in enumerate(zip(labels, extents)):
        points = torch.rand((count, 1, 2), generator=generator) * torch.tensor([width, height], dtype=torch.float32)
        sparse, dense = model.prompt_encoder(
            points=(points.to(model.device), torch.ones((count, 1), device=model.device)), boxes=None, masks=None,
        )
        # Every weight but the head's is frozen, so this pass records a graph for the head only.
        logits, iou_pred = model.mask_decoder.predict_masks(
            embeddings[b : b + 1].expand(count, -1, -1, -1), image_pe, sparse, dense
        )
        upscaled = F.interpolate(logits.detach().float(), (side, side), mode="bilinear", align_corners=False)
        target = best_object_iou(upscaled[..., :height, :width] > 0, label_image[:height, :width])
        predicted.append(iou_pred.float())
        targets.append(target)
    predicted_all, target_all = torch.cat(predicted), torch.cat(targets)
    loss = F.mse_loss(predicted_all, target_all)
    value = float(loss.detach())
    return loss, StepResult(value, 0.0, value, float(target_all.mean()), len(target_all))


# Gain on the query projection of the mask decoder's cross-attention layers when
# init_from_scratch ties their key projections to it (tie_cross_attention=True).
TIED_CROSS_ATTENTION_GAIN = 2.0


def init_from_scratch(
    model: Sam, seed: int = 0, tie_cross_attention: bool = False, positional_encoding_scale: float = 1.0,
) -> Sam:
    """Initialise every weight of ``model`` from ``seed`` for training from scratch (in place).

    Every layer gets PyTorch's default initialisation (``reset_parameters``), drawn after
    ``torch.manual_seed(seed)``, so the starting weights depend only on the seed; the
    absolute position embedding gets a truncated normal (std 0.02, as in ViT and MAE) so
    that the image embedding carries position from the start; the prompt encoder's random
    Fourier matrix is redrawn (standard normal, SAM's scale 1); relative-position tables
    start at zero, as in SAM. (Truncated-normal std 0.02 for every linear layer was tried:
    the mask decoder then stays longer on the all-background plateau.)

    ``positional_encoding_scale`` multiplies that Fourier matrix (SAM's ``scale``; 1 by
    default). Larger values encode positions with higher spatial frequencies: the dot
    product of two encodings falls off with their distance like a Gaussian of standard
    deviation ``1 / (4 pi scale)`` of the input side, about 20 px for ``vit_small`` at 1
    and 7 px at 3. With 3 the decoder was still on its all-background plateau after 260
    steps, against about 120 at 1 (docs/small-model-experiments.md), so the shipped model keeps 1.

    With ``tie_cross_attention`` (not in SAM), each cross-attention layer of the mask
    decoder (token to image, image to token) starts with its key projection equal to its
    query projection, scaled by ``TIED_CROSS_ATTENTION_GAIN``. The attention logits then
    start as a positive semi-definite form of the inputs, and the prompt tokens and the
    image positions carry the same random Fourier encoding, so an image position attends
    most to the prompt points near it from the first step. In a 400-step trial with
    ``vit_small`` and the shipped model's phase-1 settings (``benchmarks/plateau_check.py``)
    the decoder left the all-background plateau after 120 steps instead of 310, and its
    last-round IoU averaged 0.50 over steps 350-400, a level the untied run reached
    only after about 600 steps. The bundled ``vit_small`` is trained from this start
    (``scripts/train_small_model.py``).
    """
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    encoder = model.image_encoder
    if encoder.pos_embed is not None:
        torch.nn.init.trunc_normal_(encoder.pos_embed, std=0.02)
    for block in encoder.blocks:
        if getattr(block.attn, "use_rel_pos", False):
            torch.nn.init.zeros_(block.attn.rel_pos_h)
            torch.nn.init.zeros_(block.attn.rel_pos_w)
    matrix = model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    matrix.copy_(torch.randn(matrix.shape) * positional_encoding_scale)
    if tie_cross_attention:
        transformer = model.mask_decoder.transformer
        cross = [transformer.final_attn_token_to_image]
        for block in transformer.layers:
            cross += [block.cross_attn_token_to_image, block.cross_attn_image_to_token]
        with torch.no_grad():
            for attention in cross:
                attention.q_proj.weight.mul_(TIED_CROSS_ATTENTION_GAIN)
                attention.k_proj.weight.copy_(attention.q_proj.weight)
                attention.k_proj.bias.copy_(attention.q_proj.bias)
    return model


def _learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class TrainState:
    """What :func:`train` writes to ``<out_dir>/training_state.pt`` to resume."""

    step: int = 0
    history: list = field(default_factory=list)


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
    _save_atomic(model.state_dict(), out / "model.pth")
    return model


def _run_steps(
    model: Sam, data: TrainingData, config: TrainConfig, out: Path,
    progress: Optional[Callable[[int, int, StepResult], None]], log_every: int,
    replica: Replica = Replica(),
) -> None:
    """The optimisation loop of :func:`train`, over the parameters that require gradients:
    resumes from ``out/training_state.pt`` when it exists, writes the history and the
    training states (``replica`` 0 only); the caller sets which parameters train and
    writes ``model.pth``."""
    state_path = out / "training_state.pt"
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    state = TrainState()
    if state_path.exists():
        saved = torch.load(state_path, map_location=model.device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(saved["step"], saved["history"])
        if saved.get("config", {}).get("processes", 1) != config.processes:
            raise ValueError(
                f"{state_path} was written by a run with processes={saved['config'].get('processes', 1)}; "
                f"resume it with the same number of processes (got {config.processes})."
            )
        if not replica.writes:
            state.history = []
        _logger.info("Resuming from step %d of %d (%s).", state.step, config.steps, state_path)
        if saved.get("config", {}).get("steps", config.steps) != config.steps:
            _logger.warning(
                "The saved run was set up for %s steps, this one for %d: the learning-rate schedule "
                "changes, so the result differs from a run started with %d steps.",
                saved["config"]["steps"], config.steps, config.steps,
            )
        # history.jsonl may hold steps logged after the saved state: drop them, they rerun.
        if replica.writes:
            _rewrite_history(out / "history.jsonl", state.step)
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
            with open(out / "history.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            _logger.info("step %d/%d loss %.4f last-round IoU %.3f", done, config.steps, result.loss,
                         result.last_round_iou)
        if checkpoint:
            state.step = done
            _save_atomic(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                 "history": state.history, "config": asdict(config)},
                state_path,
            )


def optimization_step(
    model: Sam, optimizer: torch.optim.Optimizer, data: TrainingData, config: TrainConfig, step: int,
    functions: StepFunctions, embedding_cache: Optional[dict[int, torch.Tensor]] = None,
    replica: Replica = Replica(),
) -> StepResult:
    """Step ``step`` of a run: its batch and prompts, the loss, one clipped optimizer update.

    The batch is ``data.batch(step, config.images_per_step)``; prompts come from a generator
    seeded with ``(config.seed, step)``; the learning rate follows ``config``'s warm-up and
    cosine schedule. Used by :func:`train` and by ``benchmarks/bench_training_step.py``.
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


def _rewrite_history(path: Path, last_step: int) -> None:
    """Keep only the lines of ``history.jsonl`` up to ``last_step`` (atomic rewrite)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


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
