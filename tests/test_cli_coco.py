"""``napari-sam-amg --coco-format``: COCO files that pycocotools loads as they are, one box convention
for every COCO file we write, and COCOeval of CLI output against a ground truth from write_coco_json."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from napari_sam.cli import main
from napari_sam.io import write_coco_json

FAST = ["--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--box-nms-thresh", "1.0", "--device", "cpu", "--model-type", "vit_test"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, truck, checkpoint_factory):
    """The CLI's three JSON formats for one photo (80 x 120)."""
    folder = tmp_path_factory.mktemp("coco")
    photo = np.ascontiguousarray(truck[300:900:5, 400:1300:7][:80, :120])
    Image.fromarray(photo).save(folder / "photo.png")
    checkpoint = str(checkpoint_factory("vit_test"))
    paths = {}
    for fmt in ("reference", "results", "instances"):
        out = folder / fmt
        assert main(["--input", str(folder / "photo.png"), "--output", str(out), "--checkpoint", checkpoint,
                     "--convert-to-rle", "--coco-format", fmt, *FAST]) == 0
        paths[fmt] = out / "photo.json"
    return photo, paths


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def _bytes(rle):
    return {"size": rle["size"], "counts": rle["counts"].encode()}


def test_reference_format_is_the_references_list(outputs):
    _, paths = outputs
    records = json.loads(paths["reference"].read_text())
    assert isinstance(records, list) and records
    assert set(records[0]) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                               "stability_score", "crop_box"}
    for record in records:  # the reference's box: width = x1 - x0, one less than pycocotools'
        x, y, w, h = mask_utils.toBbox(_bytes(record["segmentation"]))
        assert record["bbox"] == [x, y, w - 1, h - 1]


def test_instances_and_results_load_in_pycocotools_with_its_boxes(outputs):
    photo, paths = outputs
    gt = quiet(COCO, str(paths["instances"]))
    assert gt.getImgIds() == [1] and gt.getCatIds() == [1]
    assert gt.imgs[1]["height"] == photo.shape[0] and gt.imgs[1]["width"] == photo.shape[1]
    reference = json.loads(paths["reference"].read_text())
    annotations = gt.loadAnns(gt.getAnnIds())
    assert len(annotations) == len(reference)
    for annotation, record in zip(annotations, reference):
        assert annotation["bbox"] == mask_utils.toBbox(_bytes(annotation["segmentation"])).tolist()
        assert annotation["score"] == record["predicted_iou"] and annotation["area"] == record["area"]
        assert annotation["segmentation"] == record["segmentation"]
        np.testing.assert_array_equal(gt.annToMask(annotation), mask_utils.decode(_bytes(record["segmentation"])))
    results = json.loads(paths["results"].read_text())
    assert all({"image_id", "category_id", "score", "segmentation", "bbox"} <= set(r) for r in results)
    detections = quiet(gt.loadRes, str(paths["results"]))
    assert len(detections.getAnnIds()) == len(reference)


def test_cocoeval_of_cli_results_against_write_coco_json_ground_truth(outputs, tmp_path):
    """Ground truth: the CLI's own masks that do not overlap, as a label image written by
    write_coco_json. Every ground-truth object then has an identical detection: recall is 1
    at every IoU threshold, which needs the two files to agree on images, categories and masks."""
    photo, paths = outputs
    results = json.loads(paths["results"].read_text())
    labels = np.zeros(photo.shape[:2], np.uint16)
    for result in sorted(results, key=lambda r: -r["score"]):
        mask = mask_utils.decode(_bytes(result["segmentation"])).astype(bool)
        if mask.any() and not labels[mask].any():
            labels[mask] = labels.max() + 1
    assert labels.max() >= 1
    truth = quiet(COCO, str(write_coco_json(tmp_path / "truth.json", labels)))
    detections = quiet(truth.loadRes, str(paths["results"]))
    evaluation = COCOeval(truth, detections, iouType="segm")
    quiet(evaluation.evaluate)
    quiet(evaluation.accumulate)
    quiet(evaluation.summarize)
    assert evaluation.stats[8] == pytest.approx(1.0)  # AR, all areas, 100 detections
    assert 0 < evaluation.stats[0] <= 1  # AP
    bbox_evaluation = COCOeval(truth, quiet(truth.loadRes, str(paths["results"])), iouType="bbox")
    quiet(bbox_evaluation.evaluate)
    quiet(bbox_evaluation.accumulate)
    quiet(bbox_evaluation.summarize)
    assert bbox_evaluation.stats[8] == pytest.approx(1.0)  # the boxes agree too (same convention)


def test_coco_format_help_documents_naming_and_both_box_conventions(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--coco-format" in text and "cells_z003" in text
    assert "[x0, y0, x1 - x0, y1 - y0]" in text and "[x0, y0, x1 - x0 + 1, y1 - y0 + 1]" in text
