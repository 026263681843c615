"""``AmgSettings``: every setting of the automatic mask generator, declared once.

Each setting is one field of :class:`AmgSettings` with its default, its bounds and a
one-line help text. The defaults are the reference's (the constructor of
``segment_anything.SamAutomaticMaskGenerator``, in the same order). Everything else is a
view of this class:

* :class:`~napari_sam.SamAutomaticMaskGenerator` takes an ``AmgSettings`` (or the
  reference's positional and keyword arguments, bound to these fields) and its
  ``inspect.signature`` is generated from the fields;
* ``napari-sam-amg`` generates one flag per tunable field (``--points-per-side`` ...);
* the "Automatic segmentation" widget generates one control per tunable field.

So a new setting is one new field here (plus its use in the generator). Per-model
threshold overrides (the bundled ``vit_small`` keeps no mask at the reference's
thresholds) come from the model facts, through :meth:`AmgSettings.for_model`.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

# Keys of a field's metadata (see setting).
_HELP, _BOUNDS, _TUNABLE, _OPEN_MAX = "help", "bounds", "tunable", "open_max"


def setting(
    default: Any,
    help: str,
    bounds: Optional[tuple[float, float]] = None,
    *,
    open_max: bool = False,
    tunable: bool = True,
) -> Any:
    """A dataclass field with the metadata of one AMG setting.

    Args:
        default: the reference's default.
        help: one line for the CLI's ``--help``, the widget's tooltip and the docs.
        bounds: (min, max) accepted values, inclusive unless ``open_max``; None: no bounds.
        open_max: the maximum itself is excluded.
        tunable: a number shown as a CLI flag and a widget control.

    Returns:
        A ``dataclasses.field``.
    """
    metadata = {_HELP: help, _BOUNDS: bounds, _OPEN_MAX: open_max, _TUNABLE: tunable}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class AmgField:
    """One tunable AMG setting as the CLI and the widget see it.

    Attributes:
        name: the keyword of ``SamAutomaticMaskGenerator`` (e.g. ``"pred_iou_thresh"``).
        type: ``int`` or ``float`` (``Optional`` removed).
        default: the default value.
        help: one line of help.
        min: smallest accepted value.
        max: largest accepted value (excluded when ``open_max``).
        open_max: whether ``max`` itself is rejected.
    """

    name: str
    type: type
    default: Any
    help: str
    min: float
    max: float
    open_max: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--pred-iou-thresh``."""
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """A label for a GUI control, e.g. ``"pred iou thresh"``."""
        return self.name.replace("_", " ")

    def check(self, value: Any) -> None:
        """Raise if ``value`` is not an accepted value of this setting (None is not checked).

        Raises:
            TypeError: not an integer (int settings) or not a real number (float settings).
            ValueError: outside the bounds (the message names the field, the bound and the value).
        """
        if value is None:
            return
        kind = numbers.Integral if self.type is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{self.name} must be {'an int' if self.type is int else 'a number'}, got {value!r}.")
        if value < self.min:
            raise ValueError(f"{self.name} must be >= {self.min}, got {value}.")
        if value > self.max or (self.open_max and value == self.max):
            raise ValueError(f"{self.name} must be {'<' if self.open_max else '<='} {self.max}, got {value}.")


@functools.lru_cache(maxsize=None)
def _tunable_fields(settings_class: type) -> tuple[AmgField, ...]:
    """:meth:`AmgSettings.tunable_fields` of ``settings_class`` (computed once per class)."""
    hints = typing.get_type_hints(settings_class)
    out = []
    for item in dataclasses.fields(settings_class):
        if not item.metadata.get(_TUNABLE, False):
            continue
        kind = hints[item.name]
        if typing.get_origin(kind) is Union:  # Optional[int] -> int
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        low, high = item.metadata[_BOUNDS]
        out.append(AmgField(item.name, kind, item.default, item.metadata[_HELP], low, high, item.metadata[_OPEN_MAX]))
    return tuple(out)


def _model_thresholds(model_type: str) -> dict[str, Any]:
    """The AMG settings that a model type uses instead of the defaults (the model registry's)."""
    from .models import amg_thresholds

    return amg_thresholds(model_type)


@dataclass(frozen=True)
class AmgSettings:
    """Settings of :class:`~napari_sam.SamAutomaticMaskGenerator`.

    Fields, defaults and order are those of the reference's constructor
    (``segment_anything.SamAutomaticMaskGenerator``); the bounds are this package's.
    Build one with keywords, change it with :meth:`replace`, or get a model's own
    thresholds with :meth:`for_model`.

    Attributes:
        points_per_side: points sampled along each side of the image (n x n grid); None
            when ``point_grids`` is given.
        points_per_batch: points decoded together (memory vs. speed; also the progress step).
        pred_iou_thresh: keep masks whose predicted IoU is > this (0: off).
        stability_score_thresh: keep masks whose stability score is >= this (0: off).
        stability_score_offset: logit shift used by the stability score.
        box_nms_thresh: box IoU above which NMS drops duplicate masks within a crop.
        crop_n_layers: extra crop layers; layer i has (2**i)**2 crops.
        crop_nms_thresh: box IoU above which NMS drops duplicates across crops.
        crop_overlap_ratio: overlap of first-layer crops, fraction of the image's short side.
        crop_n_points_downscale_factor: layer i uses points_per_side / factor**i points per side.
        point_grids: explicit grids, one Nx2 float array of normalised (x, y) in [0, 1] per
            crop layer (at least crop_n_layers + 1); None when ``points_per_side`` is given.
        min_mask_region_area: if > 0, fill holes and remove islands smaller than this (pixels).
        output_mode: "binary_mask" (HxW bool), "uncompressed_rle" or "coco_rle".

    Raises:
        ValueError: a value outside its bounds, both or neither of points_per_side /
            point_grids, too few point grids for the crop layers, or an unknown output_mode.
        TypeError: a non-integer for an int setting or a non-number for a float setting.
    """

    points_per_side: Optional[int] = setting(
        32, "Points sampled along each side of the image: a grid of n x n point prompts.", (1, 1024))
    points_per_batch: int = setting(
        64, "Points decoded together. Larger is faster but uses more memory; also the progress step.", (1, 65536))
    pred_iou_thresh: float = setting(
        0.88, "Keep masks whose predicted IoU (the model's own quality estimate) is above this (0: off).", (0.0, 1.0))
    stability_score_thresh: float = setting(
        0.95, "Keep masks whose stability score (IoU of the mask at logit +-offset) is at least this (0: off).",
        (0.0, 1.0))
    stability_score_offset: float = setting(
        1.0, "Logit offset used to compute the stability score.", (0.0, 100.0))
    box_nms_thresh: float = setting(
        0.7, "Box IoU above which duplicate masks are removed (non-maximum suppression).", (0.0, 1.0))
    crop_n_layers: int = setting(
        0, "Extra passes on zoomed-in crops (layer i has (2^i)^2 crops): finds small objects, slower.", (0, 10))
    crop_nms_thresh: float = setting(
        0.7, "Box IoU above which duplicates from different crops are removed.", (0.0, 1.0))
    crop_overlap_ratio: float = setting(
        512 / 1500, "Overlap between neighbouring crops, as a fraction of the image's short side.", (0.0, 1.0),
        open_max=True)
    crop_n_points_downscale_factor: int = setting(
        1, "Crop layer i uses points_per_side / factor^i points per side.", (1, 1024))
    point_grids: Optional[list] = setting(
        None, "Explicit point grids, one Nx2 array of normalised (x, y) per crop layer.", tunable=False)
    min_mask_region_area: int = setting(
        0, "Fill holes and remove islands smaller than this many pixels (0: off).", (0, 1_000_000_000))
    output_mode: str = setting(
        "binary_mask", "Mask format of the records: binary_mask, uncompressed_rle or coco_rle.", tunable=False)

    def __post_init__(self) -> None:
        for setting in self.tunable_fields():
            setting.check(getattr(self, setting.name))
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be given.")
        if self.point_grids is not None and len(self.point_grids) < self.crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(self.point_grids)} grids; crop_n_layers={self.crop_n_layers} needs "
                f"{self.crop_n_layers + 1} (one per layer)."
            )
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}.")

    @classmethod
    def tunable_fields(cls) -> tuple[AmgField, ...]:
        """The numeric settings offered by the CLI and the widget, in field order.

        Returns:
            One :class:`AmgField` (name, type, default, help, bounds) per tunable field.
        """
        return _tunable_fields(cls)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field name, in the reference's constructor order (the positional order)."""
        return tuple(item.name for item in dataclasses.fields(cls))

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        """One positional-or-keyword ``inspect.Parameter`` per field, with its default and type.

        Used to build the generated signature of ``SamAutomaticMaskGenerator``.
        """
        hints = typing.get_type_hints(cls)
        return [
            inspect.Parameter(item.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=item.default,
                              annotation=hints[item.name])
            for item in dataclasses.fields(cls)
        ]

    @classmethod
    def model_overrides(cls, model_type: str) -> dict[str, Any]:
        """The settings that ``model_type`` uses instead of the defaults.

        Args:
            model_type: a model type of the registry, e.g. ``"vit_small"``.

        Returns:
            Field name -> value, e.g. lower thresholds for ``"vit_small"``; empty for the
            official models (the reference's defaults suit them).
        """
        return dict(_model_thresholds(model_type))

    @classmethod
    def for_model(cls, model_type: str, **overrides: Any) -> "AmgSettings":
        """The defaults, with ``model_type``'s own settings, with ``overrides`` on top.

        Args:
            model_type: a model type of the registry.
            **overrides: field values that win over both.

        Returns:
            The settings.

        Raises:
            TypeError: an unknown field name.
            ValueError: a value outside its bounds (see the class).
        """
        return cls(**{**cls.model_overrides(model_type), **overrides})

    def replace(self, **changes: Any) -> "AmgSettings":
        """A copy with ``changes`` applied (and validated); see ``dataclasses.replace``."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """Field name -> value, in field order: keywords for ``SamAutomaticMaskGenerator``."""
        return {name: getattr(self, name) for name in self.field_names()}
