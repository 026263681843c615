"""Training data: sources of (image, label image) pairs and their conversion to the model's input frame.

A source (:class:`TrainingData`) gives the pairs of a step from the step index alone, so a
run, resumed or not, sees the same data: :class:`SyntheticData` draws endless synthetic
images, :class:`AnnotatedImages` serves a user's images with their instance labels (as
napari Labels layers hold them). :func:`prepare` turns a pair into the model's input frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from ..modeling import Sam
from ..utils.image import to_rgb_uint8
from ..utils.transforms import ResizeLongestSide
from .synthetic import SHAPES, synthetic_image


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
