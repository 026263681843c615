"""Prompts and slices: from napari-style nD layer data to SAM prompts on one 2-D slice.

Coordinate conventions used throughout this module:

* **nD data coordinates**: what napari layers store, one value per axis of the image layer
  (``(plane, row, col)`` for a 3-D stack, ``(row, col)`` for a 2-D image), in the image
  layer's *data* frame (pixel indices, before ``scale`` / ``translate``). Pixel ``i`` covers
  ``[i - 0.5, i + 0.5)`` on each axis, so its centre is at the integer ``i``.
* **slice (row, col)**: the two displayed axes of one 2-D slice, as floats.
* **SAM (x, y)**: ``x = col``, ``y = row`` in the original image frame of that slice; the
  flip happens only in :func:`rowcol_to_xy`.

Nothing here imports napari, Qt or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

POSITIVE = "positive"
NEGATIVE = "negative"
POINT_LABELS = (POSITIVE, NEGATIVE)


def rowcol_to_xy(rowcol: np.ndarray) -> np.ndarray:
    """Flip napari's (row, col) coordinates into SAM's (x, y) = (col, row).

    This is the one place where the axis order changes; everything upstream uses napari's
    (row, col), everything downstream SAM's (x, y).

    Args:
        rowcol: Nx2 array of (row, col) positions in the original image frame of a slice
            (any real dtype; pixel centres at integers).

    Returns:
        Nx2 float64 array of (x, y) positions in the same frame.

    Raises:
        ValueError: ``rowcol`` is not Nx2.
    """
    array = np.asarray(rowcol, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"Expected an Nx2 array of (row, col) positions, got shape {array.shape}.")
    return array[:, ::-1].copy()


@dataclass(frozen=True)
class SliceSpec:
    """One 2-D slice of an nD image layer: which axes are displayed and where the others sit.

    Args:
        shape: the layer's spatial shape (without an RGB(A) channel axis), one entry per axis.
        row_axis: the axis shown vertically (rows of the slice).
        col_axis: the axis shown horizontally (columns of the slice).
        index: for every axis, the integer position of the slice; ignored (stored as -1) for
            ``row_axis`` and ``col_axis``.

    Raises:
        ValueError: axes out of range or equal, wrong index length, position outside the layer.
    """

    shape: tuple[int, ...]
    row_axis: int
    col_axis: int
    index: tuple[int, ...]

    def __post_init__(self) -> None:
        ndim = len(self.shape)
        if ndim < 2:
            raise ValueError(f"An image layer needs at least 2 spatial axes, got shape {self.shape}.")
        if not (0 <= self.row_axis < ndim and 0 <= self.col_axis < ndim) or self.row_axis == self.col_axis:
            raise ValueError(
                f"row_axis and col_axis must be two different axes of a {ndim}-D layer, "
                f"got {self.row_axis} and {self.col_axis}."
            )
        if len(self.index) != ndim:
            raise ValueError(f"index must have {ndim} entries (one per axis), got {len(self.index)}.")
        index = tuple(-1 if axis in self.displayed else int(v) for axis, v in enumerate(self.index))
        for axis, value in enumerate(index):
            if axis not in self.displayed and not 0 <= value < self.shape[axis]:
                raise ValueError(
                    f"Slice position {value} on axis {axis} is outside the layer (size {self.shape[axis]})."
                )
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @classmethod
    def for_2d(cls, shape: Sequence[int]) -> "SliceSpec":
        """The single slice of a 2-D layer of spatial ``shape`` (H, W)."""
        return cls(tuple(shape), 0, 1, (-1, -1))

    @classmethod
    def from_position(
        cls, shape: Sequence[int], displayed: Sequence[int], position: Sequence[float]
    ) -> "SliceSpec":
        """The slice through a data-frame ``position``, e.g. napari's current point.

        Args:
            shape: spatial shape of the layer.
            displayed: the displayed axes in display order (the last two are used: row, col).
            position: one coordinate per axis in the layer's data frame; rounded to the
                nearest pixel and clipped into the layer on the non-displayed axes.
        """
        shape = tuple(int(v) for v in shape)
        row_axis, col_axis = (int(a) for a in tuple(displayed)[-2:])
        index = tuple(
            int(np.clip(np.floor(float(p) + 0.5), 0, size - 1)) for p, size in zip(position, shape)
        )
        return cls(shape, row_axis, col_axis, index)

    @property
    def displayed(self) -> tuple[int, int]:
        return (self.row_axis, self.col_axis)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(H, W) of the slice: sizes of the row and column axes."""
        return (self.shape[self.row_axis], self.shape[self.col_axis])

    @property
    def key(self) -> tuple[Any, ...]:
        """Hashable identity of the slice (for caches)."""
        return (self.row_axis, self.col_axis, self.index)

    def _indexer(self) -> tuple[Any, ...]:
        return tuple(slice(None) if axis in self.displayed else v for axis, v in enumerate(self.index))

    def take(self, data: Any, rgb: bool = False) -> np.ndarray:
        """Read the slice from layer data (numpy, dask, zarr, ...).

        Args:
            data: array of shape ``self.shape`` (plus a trailing channel axis when ``rgb``).
            rgb: the data has a trailing RGB(A) channel axis that is kept.

        Returns:
            HxW (or HxWxC) numpy array, rows along ``row_axis`` and columns along ``col_axis``.
        """
        plane = np.asarray(data[self._indexer()])
        if self.row_axis > self.col_axis:  # transposed display
            plane = np.swapaxes(plane, 0, 1)
        return plane

    def put(self, target: Any, plane: np.ndarray) -> None:
        """Write an HxW plane (in this slice's (row, col) frame) into the nD ``target`` at this slice.

        The inverse of :meth:`take` for label data: ``target[region] = plane``, transposed back
        when the display is transposed. Replaces the whole slice.
        """
        target[self.region()] = plane.T if self.row_axis > self.col_axis else plane

    def on_slice(self, coords: np.ndarray) -> np.ndarray:
        """Which nD data positions (N x ndim) lie on this slice (bool mask of length N).

        A position lies on the slice when every non-displayed coordinate rounds to the slice's
        index, the way napari shows points only on their own plane.
        """
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, self.ndim)
        keep = np.ones(len(coords), dtype=bool)
        for axis, value in enumerate(self.index):
            if axis not in self.displayed:
                keep &= np.floor(coords[:, axis] + 0.5) == value
        return keep

    def to_rowcol(self, coords: np.ndarray) -> np.ndarray:
        """Project nD data positions (N x ndim) onto the slice: Nx2 (row, col) floats."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, self.ndim)
        return coords[:, [self.row_axis, self.col_axis]]

    def indices(self, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """nD integer indices (a tuple of arrays, numpy fancy indexing) of a HxW mask's pixels."""
        rows, cols = np.nonzero(mask)
        out = []
        for axis, value in enumerate(self.index):
            if axis == self.row_axis:
                out.append(rows)
            elif axis == self.col_axis:
                out.append(cols)
            else:
                out.append(np.full(rows.shape, value, dtype=rows.dtype))
        return tuple(out)

    def region(self) -> tuple[Any, ...]:
        """Basic-indexing tuple selecting this slice of an nD array (a 2-D view)."""
        return self._indexer()


@dataclass
class ObjectPrompt:
    """The prompts for one object on one slice, in SAM's frame.

    Attributes:
        point_coords: Nx2 float (x, y) in the slice's original image frame (N may be 0).
        point_labels: N int, 1 positive, 0 negative.
        box: XYXY float array of shape (4,) in the same frame, or None.
    """

    point_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    box: Optional[np.ndarray] = None

    @property
    def multimask_output(self) -> bool:
        """Ask SAM for 3 masks (and keep the best) only for a single point without a box.

        The reference's README recommends multimask output for ambiguous single clicks and a
        single mask once more prompts pin the object down.
        """
        return self.box is None and len(self.point_coords) == 1

    def predict_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`napari_sam.SamPredictor.predict`."""
        kwargs: dict[str, Any] = {"multimask_output": self.multimask_output}
        if len(self.point_coords):
            kwargs["point_coords"] = self.point_coords
            kwargs["point_labels"] = self.point_labels
        if self.box is not None:
            kwargs["box"] = self.box
        return kwargs


@dataclass
class SlicePrompts:
    """The result of :func:`build_prompts`: one :class:`ObjectPrompt` per object to segment.

    Attributes:
        objects: the objects, in order (box objects first, in box order, then the object made of
            the points outside every box, if it has a positive point).
        n_outside: points and boxes on this slice that lay outside the image and were ignored.
    """

    objects: list[ObjectPrompt]
    n_outside: int = 0


def _inside(rowcol: np.ndarray, plane_shape: tuple[int, int]) -> np.ndarray:
    height, width = plane_shape
    return (
        (rowcol[:, 0] >= -0.5) & (rowcol[:, 0] < height - 0.5) & (rowcol[:, 1] >= -0.5) & (rowcol[:, 1] < width - 0.5)
    )


def build_prompts(
    spec: SliceSpec,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[Sequence[Any]] = None,
    boxes: Sequence[np.ndarray] = (),
) -> SlicePrompts:
    """Turn nD points and boxes into SAM prompts for the objects on one slice.

    Rules (documented in the README):

    * only points and boxes on the slice count (see :meth:`SliceSpec.on_slice`);
    * points whose pixel lies outside the image are dropped and counted in ``n_outside``;
    * each box is one object; a point inside a box belongs to the smallest box containing it;
    * the points inside no box make one more object when at least one of them is positive
      (negative points alone do not define an object);
    * boxes are clipped to the image; a box entirely outside it is dropped and counted.

    Args:
        spec: the slice.
        points: N x ndim point positions in the image layer's data frame.
        point_labels: N labels, each "positive" / "negative" (or True / 1 for positive).
        boxes: a sequence of K x ndim vertex arrays in the image layer's data frame (napari
            shapes); each contributes the axis-aligned bounding box of its vertices.

    Returns:
        The objects' prompts in SAM's (x, y) frame.

    Raises:
        ValueError: points and labels of different lengths or with the wrong number of axes.
    """
    n_outside = 0
    if points is None:
        points = np.zeros((0, spec.ndim))
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        points = points.reshape(0, spec.ndim)
    labels = [] if point_labels is None else list(point_labels)
    if points.ndim != 2 or points.shape[1] != spec.ndim:
        raise ValueError(f"points must be N x {spec.ndim} (one coordinate per image axis), got {points.shape}.")
    if len(labels) != len(points):
        raise ValueError(f"Got {len(points)} points but {len(labels)} point labels.")
    positive = np.array([_is_positive(v) for v in labels], dtype=bool)

    keep = spec.on_slice(points)
    rowcol = spec.to_rowcol(points[keep])
    positive = positive[keep]
    inside = _inside(rowcol, spec.plane_shape)
    n_outside += int((~inside).sum())
    rowcol, positive = rowcol[inside], positive[inside]

    height, width = spec.plane_shape
    box_list: list[np.ndarray] = []  # (row0, col0, row1, col1)
    for vertices in boxes:
        vertices = np.asarray(vertices, dtype=np.float64)
        if vertices.ndim != 2 or vertices.shape[1] != spec.ndim or len(vertices) == 0:
            raise ValueError(f"A box must be a K x {spec.ndim} array of vertices, got shape {vertices.shape}.")
        if not spec.on_slice(vertices).all():
            continue
        corners = spec.to_rowcol(vertices)
        low, high = corners.min(axis=0), corners.max(axis=0)
        low = np.maximum(low, 0.0)
        high = np.minimum(high, [height - 1, width - 1])
        if np.any(high < low):
            n_outside += 1
            continue
        box_list.append(np.concatenate([low, high]))

    objects: list[ObjectPrompt] = []
    assigned = np.full(len(rowcol), -1)
    if box_list:
        areas = np.array([(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for b in box_list])
        for i in np.argsort(areas, kind="stable")[::-1]:  # smallest box wins: assign it last
            b = box_list[i]
            within = (rowcol[:, 0] >= b[0] - 0.5) & (rowcol[:, 0] <= b[2] + 0.5)
            within &= (rowcol[:, 1] >= b[1] - 0.5) & (rowcol[:, 1] <= b[3] + 0.5)
            assigned[within] = i
    for i, b in enumerate(box_list):
        members = assigned == i
        xyxy = np.concatenate([rowcol_to_xy(b[None, :2])[0], rowcol_to_xy(b[None, 2:])[0]])
        objects.append(
            ObjectPrompt(rowcol_to_xy(rowcol[members]), positive[members].astype(np.int64), xyxy)
        )
    free = assigned == -1
    if positive[free].any():
        objects.append(ObjectPrompt(rowcol_to_xy(rowcol[free]), positive[free].astype(np.int64), None))
    return SlicePrompts(objects, n_outside)


def _is_positive(value: Any) -> bool:
    if isinstance(value, str):
        if value not in POINT_LABELS:
            raise ValueError(f"Point labels must be {POSITIVE!r} or {NEGATIVE!r}, got {value!r}.")
        return value == POSITIVE
    return bool(value)
