"""Settings of a training run (:class:`TrainConfig`), checked when made and stored in its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass


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
            points fall off objects (see :func:`~napari_sam.training.step.iou_head_step`).
            ``iterations`` is ignored.
        torch_compile: run the image encoder, the mask decoder and the mask loss of
            :func:`~napari_sam.training.step.training_step` through ``torch.compile``
            (:class:`~napari_sam.training.step.StepFunctions`; needs a C++ compiler on CPU).
            The first steps take minutes longer while the kernels are compiled, later steps
            are somewhat faster; it pays off only for long runs. Losses and weights agree
            with an eager run's to rounding error, not to the bit. The IoU-head calibration
            (``iou_head_only``) always runs eagerly.
        corrective_fraction: share of each step's prompted objects (drawn at random, at
            least one) that go on to the corrective rounds after the first prompt. 1 (the
            recipe) corrects every object; less makes a step cheaper, since the mask decoder
            runs once per object and round.
        processes: data-parallel processes on this machine (CPU only; see
            :mod:`~napari_sam.training.parallel`). Each takes ``images_per_step / processes``
            images of every batch and draws its own prompts; the gradients are combined so
            that every process applies the object-weighted mean gradient of the whole
            batch. The caller's torch threads are divided among the processes. It is meant
            for machines with more cores than one process keeps busy; with few cores it
            gains little, since the shares of a batch seldom hold as many objects and the
            processes share the memory bandwidth. A run's prompts, and so its weights,
            differ from a 1-process run's; a resumed run continues with the same number of
            processes.

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
