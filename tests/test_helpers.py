"""The shared helpers: atomic writes, the one overlap rule for painting masks, progress draining."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from napari_sam.interactive.prompts import SliceSpec
from napari_sam.utils.files import atomic_write, write_json_atomically
from napari_sam.utils.labels import paint_masks
from napari_sam.utils.progress import drain


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model.pth"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as temp:
            temp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["model.pth"]
    with atomic_write(target) as temp:
        temp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["model.pth"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkstemp's 0600


def test_atomic_write_of_a_folder_and_json(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "stale.png").write_text("x")
    with atomic_write(folder, directory=True) as temp:
        (temp / "0.png").write_text("y")
    assert sorted(os.listdir(folder)) == ["0.png"] and sorted(os.listdir(tmp_path)) == ["masks"]
    write_json_atomically(tmp_path / "a.json", {"k": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{"k": [1, 2]}'


def test_paint_masks_keeps_the_smaller_mask_visible():
    cell = np.zeros((6, 6), bool)
    cell[1:5, 1:5] = True
    nucleus = np.zeros((6, 6), bool)
    nucleus[2:4, 2:4] = True
    for order in ([nucleus, cell], [cell, nucleus]):  # whatever the order, the nucleus stays on top
        labels = paint_masks(order, (6, 6), ids=[7, 9] if order[0] is nucleus else [9, 7])
        assert labels[2, 2] == 7 and labels[1, 1] == 9 and labels[0, 0] == 0
    twin = paint_masks([nucleus, nucleus], (6, 6))
    assert twin[2, 2] == 2  # equal areas: the later one on top
    with pytest.raises(ValueError, match="shape"):
        paint_masks([np.zeros((3, 3), bool)], (6, 6))


def test_slice_put_is_the_inverse_of_take():
    data = np.zeros((3, 4, 5), np.uint16)
    spec = SliceSpec((3, 4, 5), row_axis=2, col_axis=1, index=(1, 0, 0))  # transposed display
    plane = np.arange(20, dtype=np.uint16).reshape(5, 4)
    spec.put(data, plane)
    np.testing.assert_array_equal(spec.take(data), plane)
    assert data[0].max() == 0 and data[2].max() == 0


def test_drain_returns_the_value_and_reports_progress():
    def work():
        yield 1
        yield 2
        return "done"

    seen = []
    assert drain(work(), seen.append) == "done" and seen == [1, 2]
