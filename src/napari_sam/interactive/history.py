"""Commit objects into an nD label array, with undo and redo.

Every change is stored as absolute pixel values (indices, values before, values after), so
undo and redo are idempotent: applying one twice changes nothing more. All writes go through a
``write(indices, values)`` callable; the napari adapter passes ``Labels.data_setitem`` so that
every commit, undo and redo is also an entry in napari's own Labels undo history
(Ctrl-Z / Ctrl-Shift-Z on the Labels layer) instead of bypassing it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..utils.labels import paint_masks
from .prompts import SliceSpec

Writer = Callable[[tuple[np.ndarray, ...], np.ndarray], None]


@dataclass
class Edit:
    """One commit: the nD indices written and their label values before and after.

    Attributes:
        indices: tuple of ndim int arrays (numpy fancy indexing into the label array).
        before: label values at ``indices`` before the commit.
        after: label values at ``indices`` after the commit.
        ids: the label ids given to the committed objects, in object order.
    """

    indices: tuple[np.ndarray, ...]
    before: np.ndarray
    after: np.ndarray
    ids: list[int]


def next_free_id(labels: Any) -> int:
    """The smallest id above every id used in ``labels`` (1 for an empty label array)."""
    array = np.asarray(labels)
    return int(array.max()) + 1 if array.size else 1


def plan_commit(
    labels: Any,
    spec: SliceSpec,
    masks: Sequence[np.ndarray],
    first_id: Optional[int] = None,
    preserve_existing: bool = True,
) -> Optional[Edit]:
    """Work out the edit that writes ``masks`` (one per object) into ``labels`` at ``spec``.

    Args:
        labels: nD integer label array of shape ``spec.shape``.
        spec: the slice the masks belong to.
        masks: HxW bool masks in the slice's (row, col) frame; empty masks get no id.
        first_id: id of the first object; default :func:`next_free_id`. Objects get
            consecutive ids; where masks overlap, the smaller object stays visible
            (:func:`napari_sam.utils.labels.paint_masks`).
        preserve_existing: leave pixels that already carry a label untouched (default), so
            committing never erases an earlier object or a label painted by hand.

    Returns:
        The :class:`Edit`, or None when nothing would change.

    Raises:
        ValueError: a mask of another shape than the slice, or labels of another shape.
    """
    if tuple(np.shape(labels)) != spec.shape:
        raise ValueError(f"Labels of shape {np.shape(labels)} do not match the image slice frame {spec.shape}.")
    next_id = next_free_id(labels) if first_id is None else int(first_id)
    plane = np.asarray(labels[spec.region()])
    if spec.row_axis > spec.col_axis:
        plane = plane.T
    kept, ids = [], []
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != spec.plane_shape:
            raise ValueError(f"Mask of shape {mask.shape} does not match the slice shape {spec.plane_shape}.")
        if preserve_existing:
            mask = mask & (plane == 0)
        if not mask.any():
            continue
        kept.append(mask)
        ids.append(next_id)
        next_id += 1
    if not ids:
        return None
    painted = paint_masks(kept, spec.plane_shape, ids, dtype=np.int64)
    changed = painted > 0
    indices = spec.indices(changed)
    before = np.asarray(labels[indices]).copy()
    after = painted[changed].astype(before.dtype)
    return Edit(indices, before, after, ids)


def plan_volume_commit(
    labels: Any, spec: SliceSpec, axis: int, masks: Any, first_id: Optional[int] = None,
) -> Optional[Edit]:
    """The edit that writes one object, given as a mask per slice along ``axis``, with one id.

    Args:
        labels: nD integer label array of shape ``spec.shape``.
        spec: any slice of the volume (its position on ``axis`` is replaced slice by slice;
            the other non-displayed axes stay where they are).
        axis: the axis the masks run along (not a displayed axis of ``spec``).
        masks: (N, H, W) bool, N = ``spec.shape[axis]``, each in the slice's (row, col) frame.
        first_id: the object's id; default :func:`next_free_id`.

    Returns:
        One :class:`Edit` for all slices (undone as one step), or None when nothing would
        change. Pixels that already carry a label are kept (as :func:`plan_commit`).

    Raises:
        ValueError: ``axis`` is displayed, or masks of another shape.
    """
    if axis in spec.displayed:
        raise ValueError(f"Axis {axis} is displayed; the masks must run along a non-displayed axis.")
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != (spec.shape[axis], *spec.plane_shape):
        raise ValueError(f"Masks of shape {masks.shape} do not fit {spec.shape[axis]} slices of {spec.plane_shape}.")
    object_id = next_free_id(labels) if first_id is None else int(first_id)
    parts = []
    for position in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):
        index = tuple(int(position) if a == axis else v for a, v in enumerate(spec.index))
        edit = plan_commit(labels, replace(spec, index=index), [masks[position]], first_id=object_id)
        if edit is not None:
            parts.append(edit)
    if not parts:
        return None
    indices = tuple(np.concatenate([part.indices[a] for part in parts]) for a in range(len(spec.shape)))
    return Edit(indices, np.concatenate([p.before for p in parts]), np.concatenate([p.after for p in parts]),
                [object_id])


class CommitHistory:
    """Undo and redo stacks of :class:`Edit` objects for one label array.

    Args:
        max_steps: keep at most this many undoable commits (oldest dropped first).
    """

    def __init__(self, max_steps: int = 100) -> None:
        self.max_steps = int(max_steps)
        self._undo: list[Edit] = []
        self._redo: list[Edit] = []

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def commit(self, edit: Optional[Edit], write: Writer) -> Optional[Edit]:
        """Apply ``edit`` (from :func:`plan_commit`) through ``write`` and record it."""
        if edit is None:
            return None
        write(edit.indices, edit.after)
        self._undo.append(edit)
        del self._undo[: -self.max_steps]
        self._redo.clear()
        return edit

    def undo(self, write: Writer) -> Optional[Edit]:
        """Restore the pixels of the last commit; None when there is nothing to undo."""
        if not self._undo:
            return None
        edit = self._undo.pop()
        write(edit.indices, edit.before)
        self._redo.append(edit)
        return edit

    def redo(self, write: Writer) -> Optional[Edit]:
        """Re-apply the last undone commit; None when there is nothing to redo."""
        if not self._redo:
            return None
        edit = self._redo.pop()
        write(edit.indices, edit.after)
        self._undo.append(edit)
        return edit

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()


def array_writer(labels: np.ndarray) -> Writer:
    """A writer that sets values in a numpy array in place."""

    def write(indices: tuple[np.ndarray, ...], values: np.ndarray) -> None:
        labels[indices] = values

    return write
