"""One training step's forward pass and loss, with simulated interactive prompts.

:func:`training_step` follows SAM's recipe (Kirillov et al. 2023, appendix A): pick up to
``objects_per_image`` ground-truth objects per image, give each a first prompt (a uniformly
drawn positive point or a noisy box, the same kind for the whole step), predict, then add
``iterations - 1`` corrective points drawn from the error region, each time feeding the
previous low-res logits back as the mask prompt. The loss of every round is 20 x focal +
dice on the masks (upsampled to the input frame) plus the MSE of the predicted IoU; for a
single point the best of the three multimask outputs is back-propagated (see ``losses``).
Optionally (``TrainConfig.distractor_probability``, not in SAM's recipe) a point-prompted
step adds a negative point on another object, as users click to separate neighbours.

:func:`iou_head_step` is the loss of the IoU-head calibration (``TrainConfig.iou_head_only``)
on the prompts of automatic mask generation. :class:`StepFunctions` holds the heavy
callables of a step, eager or compiled by ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..modeling import Sam
from .config import TrainConfig
from .losses import best_object_iou, mask_iou, mask_loss
from .prompts import corrective_points, noisy_boxes, sample_points_in


@dataclass
class StepResult:
    """Losses of one step (floats) and the mean IoU of the last round's masks."""

    loss: float
    mask_loss: float
    iou_loss: float
    last_round_iou: float
    objects: int


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
        and once more, with those sizes symbolic, when they first change (sizes are not
        marked dynamic up front). Compilation itself happens at the first calls (minutes on
        CPU; it needs a C++ compiler).

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
