"""COCO RLE import and export of label images (no napari needed).

Export (:func:`labels_to_coco`, :func:`write_coco_json`) writes a COCO "instances" file:
one ``images`` entry per 2-D slice of the label image (a 2-D image has one; an nD image
one per index of its leading axes, in C order), one ``annotations`` entry per label id
present in a slice, with a pycocotools RLE ``segmentation`` (``counts`` as a UTF-8
string), ``area`` (pixels), ``bbox`` [x, y, width, height] in pixels as pycocotools
computes it (width = number of columns covered), ``category_id`` 1 and ``iscrowd`` 0. The
label id itself is kept in each annotation's ``label`` field, the slice index in each
image's ``napari_sam_index`` field and the full array shape and dtype in the top-level
``napari_sam`` field, so :func:`coco_to_labels` restores the array exactly.

Import (:func:`coco_to_labels`, :func:`read_coco_json`) reads such files, other COCO
instances files (ids from ``label`` if present, else the annotation ``id``), and the list
of mask records written by ``napari-sam-amg --convert-to-rle`` (or
``SamAutomaticMaskGenerator(output_mode="coco_rle")``): masks there may overlap, so they
are painted largest first and the smaller mask stays visible; ids are 1..N in record order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from .utils.files import write_json_atomically

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_KEY = "napari_sam"


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a 2-D boolean mask, with ``counts`` as a str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """HxW bool mask of a COCO RLE (compressed ``counts`` str/bytes, or a list of run lengths)."""
    if isinstance(rle.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("utf-8")}
    return mask_utils.decode(rle).astype(bool)


def labels_to_coco(
    labels: np.ndarray,
    *,
    category: str = "object",
    file_name: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Describe a label image as a COCO instances dict (see the module docstring).

    Args:
        labels: integer array of shape (..., H, W); 0 is background, each other value an object.
        category: name of the single category.
        file_name: image file name recorded in the image entries (default: none).
        extra: JSON-serialisable values stored beside shape and dtype in the top-level
            ``napari_sam`` field (the napari writer stores the layer's scale and translate).

    Returns:
        A JSON-serialisable dict with ``images``, ``annotations``, ``categories``.

    Raises:
        ValueError: fewer than 2 dimensions, or a non-integer dtype.
    """
    array = np.asarray(labels)
    if array.ndim < 2:
        raise ValueError(f"Expected a label image of shape (..., H, W), got shape {array.shape}.")
    if array.dtype.kind not in "biu":
        raise ValueError(f"Expected integer labels, got dtype {array.dtype}.")
    height, width = array.shape[-2:]
    images, annotations = [], []
    for image_id, index in enumerate(np.ndindex(array.shape[:-2]), start=1):
        plane = array[index]
        entry = {"id": image_id, "height": int(height), "width": int(width), "napari_sam_index": list(index)}
        if file_name is not None:
            entry["file_name"] = file_name
        images.append(entry)
        present = np.unique(plane)
        present = present[present != 0]
        boxes = ndimage.find_objects(plane.astype(np.int64, copy=False) if plane.dtype.kind == "b" else plane)
        for label in present:
            region = boxes[int(label) - 1] if int(label) - 1 < len(boxes) else None
            mask = np.zeros((height, width), dtype=np.uint8, order="F")
            if region is None:
                mask[...] = plane == label
            else:
                mask[region] = plane[region] == label
            rle = encode_mask(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": int(mask_utils.area(_bytes_rle(rle))),
                    "bbox": [float(v) for v in mask_utils.toBbox(_bytes_rle(rle))],
                    "iscrowd": 0,
                    "label": int(label),
                }
            )
    return {
        "info": {"description": "Label image exported by napari-sam"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": category}],
        FORMAT_KEY: {**(extra or {}), "shape": list(array.shape), "dtype": str(array.dtype)},
    }


def _bytes_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}


def coco_to_labels(data: Union[dict[str, Any], list[dict[str, Any]]]) -> np.ndarray:
    """Rebuild a label image from COCO instances or AMG mask records.

    Args:
        data: a dict with ``images`` and ``annotations`` (COCO instances, e.g. from
            :func:`labels_to_coco`), or a list of records with an RLE ``segmentation``
            (``napari-sam-amg --convert-to-rle`` output).

    Returns:
        Integer label image: the exported shape and dtype when the file records them,
        else (H, W) (one image) or (N, H, W) (several images), uint32.

    Raises:
        ValueError: the data is neither form, or annotations refer to unknown images.
    """
    if isinstance(data, list):
        return _records_to_labels(data)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(
            "Expected COCO instances (a dict with 'images' and 'annotations') or a list of mask records "
            "with RLE 'segmentation' (napari-sam-amg --convert-to-rle output)."
        )
    images = data["images"]
    if not images:
        raise ValueError("The COCO file has no image entries.")
    meta = data.get(FORMAT_KEY, {})
    first = images[0]
    height, width = int(first["height"]), int(first["width"])
    if meta:
        shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
    else:
        shape = (height, width) if len(images) == 1 else (len(images), height, width)
        dtype = np.dtype(np.uint32)
    labels = np.zeros(shape, dtype=dtype)
    index_of = {}
    for position, image in enumerate(images):
        if (int(image["height"]), int(image["width"])) != (height, width):
            raise ValueError("All images of a COCO file must share one size to form one label image.")
        index = image.get("napari_sam_index")
        index_of[image["id"]] = tuple(index) if index is not None else ((position,) if len(shape) > 2 else ())
    for annotation in data["annotations"]:
        if annotation["image_id"] not in index_of:
            raise ValueError(f"Annotation {annotation.get('id')} refers to unknown image {annotation['image_id']}.")
        mask = decode_rle(annotation["segmentation"])
        labels[index_of[annotation["image_id"]]][mask] = annotation.get("label", annotation["id"])
    return labels


def _records_to_labels(records: list[dict[str, Any]]) -> np.ndarray:
    if not records:
        raise ValueError("The mask record list is empty: there is no image size to rebuild.")
    masks = [decode_rle(record["segmentation"]) for record in records]
    shape = masks[0].shape
    dtype = np.uint16 if len(masks) < 2**16 else np.uint32
    labels = np.zeros(shape, dtype=dtype)
    order = sorted(range(len(masks)), key=lambda i: int(masks[i].sum()), reverse=True)
    for i in order:  # largest first: smaller masks stay visible where they overlap
        labels[masks[i]] = i + 1
    return labels


def write_coco_json(path: PathLike, labels: np.ndarray, **kwargs: Any) -> Path:
    """Write :func:`labels_to_coco` of ``labels`` to ``path`` atomically (temp file + rename)."""
    return write_json_atomically(path, labels_to_coco(labels, **kwargs))


def load_json(path: PathLike) -> Any:
    """Parse a JSON file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON.
    """
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)!r} is not a JSON file: {error}") from error


def is_coco_labels(data: Any) -> bool:
    """Whether parsed JSON is COCO instances or a list of RLE mask records."""
    if isinstance(data, dict):
        return "annotations" in data and "images" in data
    return isinstance(data, list) and bool(data) and all(
        isinstance(r, dict) and isinstance(r.get("segmentation"), dict) and "size" in r["segmentation"] for r in data
    )


def read_coco_json(path: PathLike) -> np.ndarray:
    """Read a label image from a COCO instances file or AMG RLE records (see :func:`coco_to_labels`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or JSON of neither form.
    """
    return coco_to_labels(load_json(path))
