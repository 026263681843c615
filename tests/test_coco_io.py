"""COCO import of ordinary and malformed files, export cost and label ids (issue 29)."""

from __future__ import annotations

import copy
import json
import time
import tracemalloc

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from napari_sam.io import coco_to_labels, decode_segmentation, labels_to_coco, read_coco_json, write_coco_json


def polygon_coco() -> dict:
    """An ordinary COCO instances file: a polygon (two parts), an uncompressed crowd RLE, a compressed RLE."""
    crowd = np.zeros((40, 50), np.uint8, order="F")
    crowd[30:36, 5:20] = 1
    compressed = np.zeros((40, 50), np.uint8, order="F")
    compressed[2:8, 40:48] = 1
    flat = crowd.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()  # starts with a run of zeros
    rle = mask_utils.encode(compressed)
    return {
        "images": [{"id": 10, "height": 40, "width": 50, "file_name": "a.png"}],
        "annotations": [
            {"id": 3, "image_id": 10, "category_id": 1, "iscrowd": 0,
             "segmentation": [[5, 5, 25, 5, 25, 20, 5, 20], [30, 10, 40, 10, 35, 25]]},
            {"id": 7, "image_id": 10, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [40, 50], "counts": runs}},
            {"id": 9, "image_id": 10, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": [40, 50], "counts": rle["counts"].decode()}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def test_polygons_and_uncompressed_rle_read_as_pycocotools_does(tmp_path):
    data = polygon_coco()
    labels = coco_to_labels(copy.deepcopy(data))
    assert labels.shape == (40, 50)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    for annotation in data["annotations"]:
        expected = coco.annToMask(coco.anns[annotation["id"]]).astype(bool)
        assert expected.any()
        np.testing.assert_array_equal(labels == annotation["id"], expected)
    np.testing.assert_array_equal(read_coco_json(path), labels)


def _broken(change) -> dict:
    data = polygon_coco()
    change(data)
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["images"][0].pop("height"), r"image 10: missing field 'height'"),
        (lambda d: d["images"][0].update(width="50"), r"image 10: field 'width' must be an integer"),
        (lambda d: d["annotations"][1].pop("segmentation"), r"annotation 7: missing field 'segmentation'"),
        (lambda d: d["annotations"][2].pop("image_id"), r"annotation 9: missing field 'image_id'"),
        (lambda d: d["annotations"][2].update(image_id=11), r"annotation 9: field 'image_id' refers to unknown"),
        (lambda d: d["annotations"][2]["segmentation"].update(size=[30, 50]),
         r"annotation 9: 'segmentation': RLE size \[30, 50\] does not match its image's size \[40, 50\]"),
        (lambda d: d["annotations"][1]["segmentation"]["counts"].append(5),
         r"annotation 7: 'segmentation': the RLE runs cover 2005 pixels"),
        (lambda d: d["annotations"][2]["segmentation"].update(counts="0`<"),  # a 20 x 20 mask's runs
         r"annotation 9: 'segmentation': the RLE runs cover 400 pixels, its size \[40, 50\] has 2000"),
        (lambda d: d["annotations"][2]["segmentation"].update(counts="\x7f"), r"annotation 9: .*invalid character"),
        (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]), r"annotation 3: .*at least 3 points"),
        (lambda d: d["annotations"][0].update(segmentation=[]), r"annotation 3: .*empty list"),
        (lambda d: d["annotations"][0].update(segmentation="abc"), r"annotation 3: .*expected an RLE dict"),
        (lambda d: d["annotations"][2].update(id=3), r"annotation 3: duplicate annotation id"),
        (lambda d: d["images"].append(dict(d["images"][0])), r"image 10: duplicate image id"),
        (lambda d: d["annotations"][2].update(label=-4), r"annotation 9: field 'label' must be an integer >= 1"),
        (lambda d: [a.pop("id") for a in d["annotations"]], r"annotation at position 0: field 'id'|missing field 'id'"),
    ],
)
def test_malformed_entries_raise_value_error_naming_id_and_field(change, message):
    with pytest.raises(ValueError, match=message):
        coco_to_labels(_broken(change))


def test_label_that_does_not_fit_the_recorded_dtype():
    coco = labels_to_coco(np.array([[0, 200]], np.uint8))
    coco["annotations"][0]["label"] = 300
    with pytest.raises(ValueError, match="Label 300 does not fit the recorded dtype uint8"):
        coco_to_labels(coco)


def test_records_with_a_bad_segmentation_name_the_record():
    def empty(h, w):
        rle = mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))
        return {"size": rle["size"], "counts": rle["counts"].decode()}

    good = {"segmentation": empty(4, 4)}
    with pytest.raises(ValueError, match=r"record 1: missing field 'segmentation'"):
        coco_to_labels([good, {"area": 3}])
    with pytest.raises(ValueError, match=r"record 1: 'segmentation': RLE size \[5, 4\]"):
        coco_to_labels([good, {"segmentation": empty(5, 4)}])


@pytest.mark.parametrize("big", [10**8, 3 * 10**9, 2**63 + 12345])
def test_export_cost_does_not_grow_with_label_values(big):
    """A 64 x 64 image with id 1e8 took 4 GB, 3e9 failed with MemoryError; uint64 ids round-trip."""
    labels = np.zeros((64, 64), np.uint64)
    labels[3:9, 4:20] = big
    labels[30:40, 30:40] = 5
    labels[50:60, 2:6] = big - 1
    tracemalloc.start()
    start = time.perf_counter()
    try:
        coco = labels_to_coco(labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20 and time.perf_counter() - start < 5
    assert sorted(a["label"] for a in coco["annotations"]) == [5, big - 1, big]
    restored = coco_to_labels(json.loads(json.dumps(coco)))
    assert restored.dtype == np.uint64
    np.testing.assert_array_equal(restored, labels)


def test_large_ids_without_recorded_dtype_become_uint64():
    coco = labels_to_coco(np.array([[0, 7], [5 * 10**9, 0]], np.int64))
    del coco["napari_sam"]
    restored = coco_to_labels(coco)
    assert restored.dtype == np.uint64 and restored[1, 0] == 5 * 10**9


def test_negative_labels_are_refused():
    labels = np.zeros((8, 8), np.int32)
    labels[2:4, 2:4] = -3
    labels[5:7, 5:7] = 2
    with pytest.raises(ValueError, match="non-negative labels .* found -3"):
        labels_to_coco(labels)


def test_decode_segmentation_accepts_bytes_str_and_lists():
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:6] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(decode_segmentation(rle), mask)
    np.testing.assert_array_equal(decode_segmentation(dict(rle, counts=rle["counts"].decode())), mask)
    polygon = [[2, 1, 6, 1, 6, 4, 2, 4]]
    assert decode_segmentation(polygon, 6, 7).sum() > 0
    with pytest.raises(ValueError, match="polygons need the image's height and width"):
        decode_segmentation(polygon)


def test_written_boxes_use_pycocotools_convention(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[2:5, 3:9] = 1  # 3 rows, 6 columns
    payload = json.loads(write_coco_json(tmp_path / "l.json", labels).read_text())
    assert payload["annotations"][0]["bbox"] == [3.0, 2.0, 6.0, 3.0]
