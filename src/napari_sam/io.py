"""COCO import and export of label images (no napari needed).

Export (:func:`labels_to_coco`, :func:`write_coco_json`) writes a COCO "instances" file:
one ``images`` entry per 2-D slice of the label image (a 2-D image has one; an nD image
one per index of its leading axes, in C order, ``id`` 1, 2, ...), one ``annotations`` entry
per label id present in a slice, with a pycocotools RLE ``segmentation`` (``counts`` as a
UTF-8 string), ``area`` (pixels), ``bbox`` [x, y, width, height] in pixels as pycocotools'
``toBbox`` computes it (width = number of columns covered), ``category_id`` 1 and
``iscrowd`` 0. The label id itself is kept in each annotation's ``label`` field, the slice
index in each image's ``napari_sam_index`` field and the full array shape and dtype in the
top-level ``napari_sam`` field, so :func:`coco_to_labels` restores the array exactly. Label
ids may be any non-negative integers of the dtype (uint64 included): the cost depends on the
number of objects, not on the values; negative labels are refused.

Import (:func:`coco_to_labels`, :func:`read_coco_json`) reads such files, other COCO
instances files (ids from ``label`` if present, else the annotation ``id``; the
segmentation as compressed RLE, uncompressed RLE or polygons, decoded by pycocotools;
overlapping annotations: the later one wins), and the list of mask records written by
``napari-sam-amg --convert-to-rle`` (or ``SamAutomaticMaskGenerator(output_mode="coco_rle")``)
or its ``--coco-format results`` list: masks there may overlap, so they are painted largest
first and the smaller mask stays visible; ids are 1..N in record order (one slice per
``image_id`` when records have several). Every malformed entry raises ``ValueError`` naming
the annotation (or image, or record) and the field; duplicate image or annotation ids are
refused rather than merged.

Boxes: files written here (and ``napari-sam-amg --coco-format results|instances``) use
pycocotools' convention ``[x0, y0, x1 - x0 + 1, y1 - y0 + 1]`` (x1, y1 the last covered
column and row); the Python records of ``SamAutomaticMaskGenerator.generate``, the CLI's
``reference`` JSON and its metadata.csv keep the reference's ``[x0, y0, x1 - x0, y1 - y0]``.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

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


def _rle_string_counts(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``).

    pycocotools does not check that the runs cover the image exactly (a short string decodes
    into uninitialised memory), so :func:`decode_segmentation` checks their sum with this.

    Raises:
        ValueError: a character outside the encoding, a truncated or negative run.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("the compressed RLE string is truncated")
            code = counts[position] - 48
            if not 0 <= code < 64:
                raise ValueError(f"the compressed RLE string has an invalid character {chr(counts[position])!r}")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            position += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("the compressed RLE string has a negative run length")
        runs.append(value)
    return runs


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


def decode_segmentation(
    segmentation: Any, height: Optional[int] = None, width: Optional[int] = None, *, what: str = "segmentation"
) -> np.ndarray:
    """HxW bool mask of a COCO ``segmentation``, checked before pycocotools decodes it.

    Args:
        segmentation: compressed RLE (``{"size": [h, w], "counts": str or bytes}``),
            uncompressed RLE (``counts`` a list of run lengths) or polygons (a list of
            ``[x0, y0, x1, y1, ...]`` lists, at least 3 points each).
        height: the image height the mask must have (required for polygons).
        width: the image width the mask must have (required for polygons).
        what: how error messages name the entry, e.g. ``"annotation 7"``.

    Returns:
        HxW bool array.

    Raises:
        ValueError: malformed, or of another size than (height, width); the message names
            ``what`` and the field.
    """
    field = f"{what}: 'segmentation'"
    if isinstance(segmentation, dict):
        if "size" not in segmentation or "counts" not in segmentation:
            raise ValueError(f"{field}: expected an RLE with 'size' and 'counts', got keys {sorted(segmentation)}.")
        size, counts = segmentation["size"], segmentation["counts"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_integer(v) and v >= 0 for v in size)):
            raise ValueError(f"{field}: expected 'size' [height, width] of non-negative integers, got {size!r}.")
        h, w = int(size[0]), int(size[1])
        if height is not None and (h, w) != (height, width):
            raise ValueError(f"{field}: RLE size [{h}, {w}] does not match its image's size [{height}, {width}].")
        if isinstance(counts, list):
            if not all(_is_integer(v) and v >= 0 for v in counts):
                raise ValueError(f"{field}: uncompressed RLE 'counts' must be non-negative integers.")
            runs = counts
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": [int(v) for v in counts]}, h, w)
        elif isinstance(counts, (str, bytes)):
            encoded = counts.encode("utf-8") if isinstance(counts, str) else counts
            try:
                runs = _rle_string_counts(encoded)
            except ValueError as error:
                raise ValueError(f"{field}: {error}.") from error
            rle = {"size": [h, w], "counts": encoded}
        else:
            raise ValueError(f"{field}: expected 'counts' as a string or a list of run lengths, "
                             f"got {type(counts).__name__}.")
        if sum(runs) != h * w:
            raise ValueError(f"{field}: the RLE runs cover {sum(runs)} pixels, its size [{h}, {w}] has {h * w}.")
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation, list):
        if height is None or width is None:
            raise ValueError(f"{field}: polygons need the image's height and width.")
        if not segmentation:
            raise ValueError(f"{field}: expected polygons or an RLE, got an empty list.")
        for polygon in segmentation:
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                    and all(_is_number(v) for v in polygon)):
                raise ValueError(
                    f"{field}: expected polygons as lists of x, y numbers (at least 3 points), got {polygon!r:.80}."
                )
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in segmentation], height, width))
        return mask_utils.decode(rle).astype(bool)
    raise ValueError(f"{field}: expected an RLE dict or a list of polygons, got {type(segmentation).__name__}.")


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """HxW bool mask of a COCO RLE (compressed ``counts`` str/bytes, or a list of run lengths).

    Raises:
        ValueError: malformed (see :func:`decode_segmentation`).
    """
    return decode_segmentation(rle, what="RLE")


def labels_to_coco(
    labels: np.ndarray,
    *,
    category: str = "object",
    file_name: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Describe a label image as a COCO instances dict (see the module docstring).

    The work is proportional to the pixels and the number of objects, whatever the label
    values (ids are relabelled to 1..K per slice with ``np.unique`` before ``find_objects``).

    Args:
        labels: integer array of shape (..., H, W); 0 is background, each other value an
            object (non-negative; any integer dtype, uint64 included).
        category: name of the single category.
        file_name: image file name recorded in the image entries (default: none).
        extra: JSON-serialisable values stored beside shape and dtype in the top-level
            ``napari_sam`` field (the napari writer stores the layer's scale and translate).

    Returns:
        A JSON-serialisable dict with ``images``, ``annotations``, ``categories``.

    Raises:
        ValueError: fewer than 2 dimensions, a non-integer dtype, or negative labels.
    """
    array = np.asarray(labels)
    if array.ndim < 2:
        raise ValueError(f"Expected a label image of shape (..., H, W), got shape {array.shape}.")
    if array.dtype.kind not in "biu":
        raise ValueError(f"Expected integer labels, got dtype {array.dtype}.")
    if array.dtype.kind == "i" and array.size and array.min() < 0:
        raise ValueError(
            f"Expected non-negative labels (0 is background, objects > 0), found {int(array.min())}; "
            "COCO export cannot store negative label ids."
        )
    height, width = array.shape[-2:]
    images, annotations = [], []
    for image_id, index in enumerate(np.ndindex(array.shape[:-2]), start=1):
        plane = array[index]
        entry = {"id": image_id, "height": int(height), "width": int(width), "napari_sam_index": list(index)}
        if file_name is not None:
            entry["file_name"] = file_name
        images.append(entry)
        present, compact = np.unique(plane, return_inverse=True)
        compact = compact.reshape(plane.shape)
        if present.size and present[0] == 0:  # compact ids: 0 background, 1..K the objects in present[1:]
            objects = present[1:]
        else:
            objects, compact = present, compact + 1
        boxes = ndimage.find_objects(compact.astype(np.intp, copy=False), max_label=len(objects))
        for k, (label, region) in enumerate(zip(objects, boxes), start=1):
            mask = np.zeros((height, width), dtype=np.uint8, order="F")
            mask[region] = compact[region] == k
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


def amg_records_to_coco(
    records: Sequence[dict[str, Any]], image_id: int, *, first_id: int = 1, category_id: int = 1
) -> list[dict[str, Any]]:
    """COCO annotations of automatic mask generator records (``napari-sam-amg --coco-format``).

    Args:
        records: records of ``SamAutomaticMaskGenerator.generate`` (any ``output_mode``).
        image_id: the COCO image they belong to.
        first_id: the annotation id of the first record (then consecutive).
        category_id: the category of every mask.

    Returns:
        One annotation per record: ``id``, ``image_id``, ``category_id``, ``segmentation``
        (compressed RLE, str counts), ``area``, ``bbox`` in pycocotools' convention (toBbox:
        width = covered columns, unlike the record's reference-style bbox), ``iscrowd`` 0,
        ``score`` (the predicted IoU), and the record's ``predicted_iou``,
        ``stability_score``, ``point_coords`` and ``crop_box``.
    """
    out = []
    for offset, record in enumerate(records):
        segmentation = record["segmentation"]
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            segmentation = encode_mask(decode_segmentation(segmentation, what=f"record {offset}"))
        elif not isinstance(segmentation, dict):
            segmentation = encode_mask(np.asarray(segmentation, dtype=bool))
        elif isinstance(segmentation["counts"], bytes):
            segmentation = {"size": list(segmentation["size"]), "counts": segmentation["counts"].decode("utf-8")}
        rle = _bytes_rle(segmentation)
        out.append(
            {
                "id": first_id + offset,
                "image_id": int(image_id),
                "category_id": int(category_id),
                "segmentation": segmentation,
                "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
                "score": float(record["predicted_iou"]),
                "predicted_iou": float(record["predicted_iou"]),
                "stability_score": float(record["stability_score"]),
                "point_coords": [[float(v) for v in point] for point in record["point_coords"]],
                "crop_box": [int(v) for v in record["crop_box"]],
            }
        )
    return out


def _positive_int(entry: dict[str, Any], key: str, what: str, *, minimum: int = 1) -> int:
    if key not in entry:
        raise ValueError(f"{what}: missing field {key!r}.")
    value = entry[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_integer(value) or value < minimum:
        raise ValueError(f"{what}: field {key!r} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _id_of(entry: dict[str, Any], what: str) -> Any:
    if "id" not in entry:
        raise ValueError(f"{what}: missing field 'id'.")
    value = entry["id"]
    if not (_is_integer(value) or isinstance(value, str)):
        raise ValueError(f"{what}: field 'id' must be an integer or a string, got {value!r}.")
    return value


def _label_dtype(largest: int) -> np.dtype:
    for dtype in (np.uint32, np.uint64):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"Label id {largest} does not fit in uint64.")


def coco_to_labels(data: Union[dict[str, Any], list[dict[str, Any]]]) -> np.ndarray:
    """Rebuild a label image from COCO instances or AMG mask records.

    Args:
        data: a dict with ``images`` and ``annotations`` (COCO instances, e.g. from
            :func:`labels_to_coco`), or a list of records with an RLE ``segmentation``
            (``napari-sam-amg --convert-to-rle`` output).

    Returns:
        Integer label image: the exported shape and dtype when the file records them,
        else (H, W) (one image) or (N, H, W) (several images), uint32 (uint64 when an id
        needs it).

    Raises:
        ValueError: the data is neither form; an image or annotation lacks a field or has
            a malformed one (the message names its id and the field); duplicate image or
            annotation ids; a mask whose size differs from its image; a label that is not a
            positive integer or does not fit the recorded dtype.
    """
    if isinstance(data, list):
        return _records_to_labels(data)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(
            "Expected COCO instances (a dict with 'images' and 'annotations') or a list of mask records "
            "with RLE 'segmentation' (napari-sam-amg --convert-to-rle output)."
        )
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError("Expected 'images' and 'annotations' to be lists.")
    if not images:
        raise ValueError("The COCO file has no image entries.")
    sizes, positions = {}, {}
    for position, image in enumerate(images):
        if not isinstance(image, dict):
            raise ValueError(f"images[{position}]: expected an object, got {type(image).__name__}.")
        image_id = _id_of(image, f"image at position {position}")
        what = f"image {image_id!r}"
        if image_id in sizes:
            raise ValueError(f"{what}: duplicate image id (two images would share one slice).")
        sizes[image_id] = (_positive_int(image, "height", what), _positive_int(image, "width", what))
        positions[image_id] = position
    height, width = next(iter(sizes.values()))
    for image_id, size in sizes.items():
        if size != (height, width):
            raise ValueError(
                f"image {image_id!r}: size {list(size)} differs from the first image's [{height}, {width}]; "
                "all images of a COCO file must share one size to form one label image."
            )
    meta = data.get(FORMAT_KEY) or {}
    if meta:
        try:
            shape, dtype = tuple(int(v) for v in meta["shape"]), np.dtype(meta["dtype"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"The {FORMAT_KEY!r} field needs 'shape' and 'dtype': {error}") from error
        if len(shape) < 2 or shape[-2:] != (height, width) or dtype.kind not in "biu":
            raise ValueError(f"The {FORMAT_KEY!r} field's shape {list(shape)} and dtype {dtype} do not fit "
                             f"images of [{height}, {width}] and integer labels.")
    else:
        shape = (height, width) if len(images) == 1 else (len(images), height, width)
        dtype = None
    index_of = {}
    for image in images:
        image_id = image["id"]
        index = image.get("napari_sam_index") if meta else None
        if index is None:
            index = (positions[image_id],) if len(shape) > 2 else ()
        index = tuple(index) if isinstance(index, (list, tuple)) else index
        if (not isinstance(index, tuple) or len(index) != len(shape) - 2
                or not all(_is_integer(i) and 0 <= i < n for i, n in zip(index, shape))):
            raise ValueError(f"image {image_id!r}: 'napari_sam_index' {index!r} does not fit the shape {list(shape)}.")
        index_of[image_id] = index
    painted = []
    seen_ids = set()
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise ValueError(f"annotations[{position}]: expected an object, got {type(annotation).__name__}.")
        what = f"annotation {annotation['id']!r}" if "id" in annotation else f"annotation at position {position}"
        if "id" in annotation:
            annotation_id = _id_of(annotation, what)
            if annotation_id in seen_ids:
                raise ValueError(f"{what}: duplicate annotation id (two objects would merge into one label).")
            seen_ids.add(annotation_id)
        if "image_id" not in annotation:
            raise ValueError(f"{what}: missing field 'image_id'.")
        if annotation["image_id"] not in index_of:
            raise ValueError(f"{what}: field 'image_id' refers to unknown image {annotation['image_id']!r}.")
        if "segmentation" not in annotation:
            raise ValueError(f"{what}: missing field 'segmentation'.")
        if "label" in annotation:
            label = _positive_int(annotation, "label", what)
        else:
            label = _positive_int(annotation, "id", what)
        mask = decode_segmentation(annotation["segmentation"], height, width, what=what)
        painted.append((index_of[annotation["image_id"]], mask, label))
    largest = max((label for _, _, label in painted), default=0)
    if dtype is None:
        dtype = _label_dtype(largest)
    elif largest > (1 if dtype.kind == "b" else np.iinfo(dtype).max):
        raise ValueError(f"Label {largest} does not fit the recorded dtype {dtype}.")
    labels = np.zeros(shape, dtype=dtype)
    for index, mask, label in painted:
        labels[index][mask] = label
    return labels


def _records_to_labels(records: list[dict[str, Any]]) -> np.ndarray:
    from .utils.labels import paint_masks

    if not records:
        raise ValueError("The mask record list is empty: there is no image size to rebuild.")
    groups: dict[Any, list[tuple[np.ndarray, int]]] = {}
    shape = None
    for position, record in enumerate(records):
        what = f"record {position}"
        if not isinstance(record, dict):
            raise ValueError(f"{what}: expected an object, got {type(record).__name__}.")
        if "segmentation" not in record:
            raise ValueError(f"{what}: missing field 'segmentation'.")
        if not isinstance(record["segmentation"], dict):
            raise ValueError(f"{what}: 'segmentation' must be an RLE dict (records carry no image size).")
        mask = decode_segmentation(record["segmentation"], *(shape or (None, None)), what=what)
        shape = shape or mask.shape
        groups.setdefault(record.get("image_id", 1), []).append((mask, position + 1))
    try:
        order = sorted(groups)
    except TypeError:
        order = list(groups)
    dtype = np.uint16 if len(records) < 2**16 else np.uint32
    slices = [
        paint_masks([m for m, _ in groups[key]], shape, ids=[i for _, i in groups[key]], dtype=dtype)
        for key in order
    ]
    return slices[0] if len(slices) == 1 else np.stack(slices)


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
