"""COCO RLE export/import of label images round-trips exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils
from skimage import data, measure

from napari_sam.io import coco_to_labels, labels_to_coco, read_coco_json, write_coco_json


def real_labels() -> np.ndarray:
    """Connected components of the thresholded coins photo: touching objects, holes."""
    coins = data.coins()
    return measure.label(coins > 110).astype(np.uint16)


def test_round_trip_real_labels(tmp_path):
    labels = real_labels()
    assert labels.max() > 10
    path = write_coco_json(tmp_path / "coins.json", labels)
    restored = read_coco_json(path)
    assert restored.dtype == labels.dtype
    np.testing.assert_array_equal(restored, labels)
    payload = json.loads(path.read_text())
    assert len(payload["images"]) == 1 and len(payload["annotations"]) == labels.max()
    first = payload["annotations"][0]
    mask = labels == first["label"]
    assert first["area"] == mask.sum()
    rows, cols = np.nonzero(mask)
    assert first["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    assert isinstance(first["segmentation"]["counts"], str)


def test_holes_parts_touching_objects_and_sparse_ids():
    labels = np.zeros((40, 50), dtype=np.int32)
    labels[5:30, 5:30] = 7  # a square with a hole
    labels[12:18, 12:18] = 0
    labels[5:30, 30:45] = 1000  # touches label 7
    labels[35:38, 2:6] = 3  # two separate parts of one object
    labels[35:38, 40:48] = 3
    restored = coco_to_labels(json.loads(json.dumps(labels_to_coco(labels))))
    np.testing.assert_array_equal(restored, labels)


def test_nd_labels_export_one_image_per_slice():
    labels = np.zeros((2, 3, 16, 20), dtype=np.uint8)
    labels[0, 1, 2:5, 3:9] = 4
    labels[1, 2, 10:14, 0:20] = 9
    coco = labels_to_coco(labels)
    assert len(coco["images"]) == 6
    assert [a["image_id"] for a in coco["annotations"]] == [2, 6]
    np.testing.assert_array_equal(coco_to_labels(coco), labels)


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint16, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 6)))
def test_round_trip_property(labels):
    np.testing.assert_array_equal(coco_to_labels(json.loads(json.dumps(labels_to_coco(labels)))), labels)


def test_amg_records_paint_larger_masks_first():
    big = np.zeros((30, 30), dtype=bool)
    big[:20, :20] = True
    small = np.zeros_like(big)
    small[5:10, 5:10] = True

    def record(mask):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "area": int(mask.sum())}

    labels = coco_to_labels([record(small), record(big)])
    assert labels[7, 7] == 1 and labels[15, 15] == 2 and labels[25, 25] == 0


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="integer labels"):
        labels_to_coco(np.zeros((4, 4), dtype=float))
    with pytest.raises(ValueError, match="COCO instances"):
        coco_to_labels({"something": 1})
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_coco_json(path)


@settings(max_examples=25, deadline=None)
@given(
    arrays(np.uint32, st.tuples(st.integers(1, 3), st.integers(1, 20), st.integers(1, 20)), elements=st.integers(0, 9)),
    st.tuples(st.floats(0.1, 5), st.floats(0.1, 5), st.floats(0.1, 5)),
)
def test_napari_writer_and_reader_round_trip(tmp_path_factory, labels, scale):
    """The manifest's writer and reader (plain functions) on random nD label images."""
    from napari_sam._napari._io import get_reader, write_labels

    path = str(tmp_path_factory.mktemp("coco") / "labels.json")
    assert write_labels(path, labels, {"scale": scale, "translate": (0, 1, 2), "name": "cells"}) == [path]
    reader = get_reader(path)
    assert reader is not None
    (data, kwargs, kind), = reader(path)
    assert kind == "labels" and kwargs["name"] == "cells"
    np.testing.assert_array_equal(data, labels)
    assert data.dtype == labels.dtype
    np.testing.assert_allclose(kwargs["scale"], scale)
