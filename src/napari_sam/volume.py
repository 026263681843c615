"""Segment through a 3-D stack or a time-lapse (napari-free core).

Two tasks:

* **Propagation** (:func:`propagation_steps`, :func:`segment_volume`): one object, given on
  one or several slices (the *anchors*: from the user's prompts, or masks), is segmented on
  the neighbouring slices one after the other, each slice prompted from the result on its
  neighbour (the *projection*, see below), until the object ends. Works along any axis:
  z of a stack, or t of a time-lapse (one object tracked through time; a dividing cell is
  **not** handled: the prompt follows one of the daughters, or both while they touch).
* **Automatic 3-D** (:func:`automatic_volume_steps`, :func:`segment_volume_automatic`): the
  automatic mask generator on every slice, then the per-slice masks linked into 3-D objects
  by overlap between neighbouring slices (:func:`link_slices`).

Projection (how slice z+1 is prompted from the mask on slice z), chosen by measurement on
the synthetic volumes of ``benchmarks/bench_volume.py`` (16-bit, noisy, drifting and
shape-changing blobs, touching objects, objects ending mid-stack; bundled ``vit_small``,
one positive click on each object's middle slice)::

    projection            mean 3-D IoU   worst end-slice error (slices)
    "box"                     0.887          1
    "box_point"               0.912          1      <- the default
    "box_logits"              0.883          1
    "box_point_logits"        0.862          1

(box_margin 0, min_predicted_iou 0.5, min_overlap 0.3; with a 2-pixel margin every
projection was worse, 0.84-0.88, as the mask grows into a touching neighbour. Without the
predicted-IoU rule, objects ran 1-3 slices past their ends.) The default is
:data:`DEFAULT_PROJECTION`; :data:`PROJECTION_FIGURES` holds the figures. These were tuned
on that one synthetic volume (seed 0); the benchmark also reports another noise seed. Every projection uses the box of the previous mask (enlarged by ``box_margin``
pixels, so a drifting object stays inside); "box_point" adds one positive point at the
previous mask's most interior pixel (the distance-transform maximum); "box_logits" adds the
previous slice's low-res logits as SAM's mask input.

Stopping (per direction, configurable in :class:`PropagationSettings`): the slice's mask is
smaller than ``min_area`` pixels, its predicted IoU is below ``min_predicted_iou``, or its IoU
with the previous slice's mask is below ``min_overlap``. That slice stays empty and the
direction ends there. Between two anchors, both anchors propagate towards the middle; anchors
are never overwritten.

Progress and cancellation: the work is a generator (:func:`propagation_steps`) that yields a
:class:`VolumeProgress` after every image-encoder block of every visited slice, and returns
the result; closing it (``generator.close()``, a napari worker's ``quit()``) stops it between
two steps. Embeddings are computed on demand, only for the slices visited.

Intensities: ONE contrast mapping for the whole volume (given ``contrast_limits``, e.g. the
layer's, mapped as the interactive widget maps a displayed slice; default: uint8 as is, other
dtypes from the 0.5th and 99.5th percentiles of the whole volume), so a slice's brightness
does not change how it is mapped (see :class:`VolumeSlices`). Volumes are read slice by slice
(numpy, dask or zarr arrays).

For the napari plugin: :func:`segment_volume_steps` with ``engine=`` (a ``SamEngine``: its
model, embedding cache and lock, taken per step) and ``cache_key=`` runs as a worker's
generator; ``quit()`` / ``close()`` cancels between two steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .utils.image import ROBUST_PERCENTILES
from .utils.labels import paint_masks
from .utils.progress import drain

PROJECTIONS = ("box", "box_point", "box_logits", "box_point_logits")
DEFAULT_PROJECTION = "box_point"
#: Measured by benchmarks/bench_volume.py (filled in from its output; see the module docstring).
PROJECTION_FIGURES: dict[str, tuple[float, int]] = {
    # projection: (mean 3-D IoU over the 4 objects, worst end-slice error), box_margin 0,
    # min_predicted_iou 0.5, min_overlap 0.3 (with box_margin 2 every projection was worse:
    # 0.840, 0.881, 0.868, 0.842).
    "box": (0.887, 1),
    "box_point": (0.912, 1),
    "box_logits": (0.883, 1),
    "box_point_logits": (0.862, 1),
}

ProgressCallback = Callable[["VolumeProgress"], None]


class VolumeProgress(NamedTuple):
    """Progress of volume work: ``done`` of ``total`` slices (``total`` shrinks when a
    direction stops early), on slice ``slice_index``; ``step`` of ``steps`` within that
    slice's work (image-encoder blocks for propagation, point batches for AMG)."""

    done: int
    total: int
    slice_index: int
    step: int
    steps: int


@dataclass(frozen=True)
class PropagationSettings:
    """How propagation prompts each slice and when it stops.

    Attributes:
        projection: one of :data:`PROJECTIONS` (default :data:`DEFAULT_PROJECTION`).
        box_margin: pixels added on each side of the previous mask's box (default 0: measured
            better than 2, which lets the mask grow into a touching neighbour).
        min_area: stop when the mask has fewer pixels (default 10).
        min_predicted_iou: stop when SAM's predicted IoU of the mask is lower (default 0.5).
        min_overlap: stop when the IoU of the mask with the previous slice's mask is lower
            (default 0.3; objects that move more than about half their size between slices
            need less).
    """

    projection: str = DEFAULT_PROJECTION
    box_margin: float = 0.0
    min_area: int = 10
    min_predicted_iou: float = 0.5
    min_overlap: float = 0.3

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}.")
        if not 0.0 <= self.min_predicted_iou <= 1.0 or not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError("min_predicted_iou and min_overlap must lie in [0, 1].")
        if self.min_area < 0 or self.box_margin < 0:
            raise ValueError("min_area and box_margin must not be negative.")


@dataclass
class SliceResult:
    """The mask found on one slice and the numbers the stopping rules read."""

    mask: np.ndarray
    predicted_iou: float
    overlap: float
    logits: Optional[np.ndarray] = None


@dataclass
class PropagationResult:
    """Masks of one object over the stack.

    Attributes:
        masks: (N, H, W) bool, N slices along the propagation axis.
        slices: visited slice -> :class:`SliceResult` (anchors not included).
        stopped: slice where each stop happened -> the reason ("area", "predicted_iou", "overlap").
    """

    masks: np.ndarray
    slices: dict[int, SliceResult] = field(default_factory=dict)
    stopped: dict[int, str] = field(default_factory=dict)


# -- intensities ---------------------------------------------------------------------------------
def volume_contrast_limits(volume: np.ndarray) -> tuple[float, float]:
    """One (low, high) for the whole volume: its 0.5th and 99.5th percentiles of finite values
    (sampled to at most ~4 M values for speed)."""
    values = np.asarray(volume).reshape(-1)
    if values.size > 4_000_000:
        values = values[:: values.size // 4_000_000 + 1]
    values = values.astype(np.float32, copy=False)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


class VolumeSlices:
    """Read 2-D slices of a volume along one axis, without loading the whole volume.

    Works for numpy arrays and for lazy array-likes with ``shape``, ``dtype`` and numpy-style
    indexing (dask, zarr: a napari layer's data); each slice is read when asked for.

    Args:
        volume: (N, H, W) or RGB(A) (N, H, W, 3|4) (a trailing axis of 3 or 4 is colour), N along ``axis``.
        axis: the slicing axis among the three spatial axes.

    Raises:
        ValueError: not 3 spatial axes (a 2-D image says so), an axis out of range, an empty volume.
    """

    def __init__(self, volume: Any, axis: int = 0) -> None:
        self.volume = volume if hasattr(volume, "shape") and hasattr(volume, "dtype") else np.asarray(volume)
        shape = tuple(int(v) for v in self.volume.shape)
        self.rgb = len(shape) == 4 and shape[-1] in (3, 4)
        spatial = len(shape) - (1 if self.rgb else 0)
        if spatial != 3:
            raise ValueError(
                "Expected a 3-D volume (N, H, W) or an RGB(A) volume (N, H, W, 3|4) along the propagation axis; "
                f"got shape {shape}" + (" (a 2-D image: use SamPredictor)." if spatial == 2 else ".")
            )
        if not -3 <= int(axis) < 3:
            raise ValueError(f"axis {axis} is out of range for a volume of 3 spatial axes.")
        self.axis = int(axis) % 3
        if 0 in shape:
            raise ValueError(f"Expected a non-empty volume, got shape {shape}.")
        self.shape = shape  # the volume's own shape
        plane = [n for i, n in enumerate(shape[:3]) if i != self.axis]
        self.plane_shape: tuple[int, int] = (plane[0], plane[1])
        self.dtype = np.dtype(self.volume.dtype)

    def __len__(self) -> int:
        return self.shape[self.axis]

    def plane(self, index: int) -> np.ndarray:
        """Slice ``index`` as HxW (or HxWx3|4) numpy array."""
        indexer = tuple(index if i == self.axis else slice(None) for i in range(3))
        return np.asarray(self.volume[indexer])

    def contrast_limits(self, max_slices: int = 16) -> tuple[float, float]:
        """(low, high): the 0.5th and 99.5th percentiles of the whole volume (numpy), or of up to
        ``max_slices`` evenly spaced slices (lazy arrays, so that nothing else is read)."""
        if isinstance(self.volume, np.ndarray):
            return volume_contrast_limits(self.volume)
        picks = np.unique(np.linspace(0, len(self) - 1, min(len(self), max_slices)).round().astype(int))
        return volume_contrast_limits(np.stack([self.plane(int(i)) for i in picks]))

    def rgb_reader(self, contrast_limits: Optional[Sequence[float]] = None) -> Callable[[int], np.ndarray]:
        """A function giving slice i as SAM's HxWx3 uint8 input, ONE mapping for all slices:
        :func:`~napari_sam.interactive.engine.display_rgb` with ``contrast_limits`` (as the
        interactive widget maps a displayed slice), default: uint8 as is, other dtypes from
        :meth:`contrast_limits` of the whole volume."""
        from .interactive.engine import display_rgb

        limits = None
        if contrast_limits is not None:
            limits = (float(contrast_limits[0]), float(contrast_limits[1]))
        elif self.dtype != np.uint8:
            limits = self.contrast_limits()
        return lambda index: display_rgb(self.plane(index), limits, self.rgb)

    def stack(self, masks: np.ndarray) -> np.ndarray:
        """(N, H, W) per-slice results put back in the volume's spatial axis order."""
        return np.moveaxis(masks, 0, self.axis)


def volume_to_rgb(volume: Any, contrast_limits: Optional[Sequence[float]] = None, axis: int = 0) -> Callable[[int], np.ndarray]:
    """A function giving slice i (along ``axis``) as HxWx3 uint8 RGB with one mapping for the
    whole volume (see :meth:`VolumeSlices.rgb_reader`)."""
    return VolumeSlices(volume, axis).rgb_reader(contrast_limits)


# -- prompts from masks --------------------------------------------------------------------------
def mask_box(mask: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """XYXY box around a mask's pixels (pixel centres), enlarged by ``margin``, clipped to the image."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return np.array([max(cols[0] - margin, 0), max(rows[0] - margin, 0),
                     min(cols[-1] + margin, w - 1), min(rows[-1] + margin, h - 1)], dtype=np.float64)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask's pixel farthest from its border."""
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([[col, row]], dtype=np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean arrays (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _project(predictor: Any, previous: np.ndarray, logits: Optional[np.ndarray],
             settings: PropagationSettings) -> tuple[np.ndarray, float, np.ndarray]:
    """Predict the object on the predictor's current slice from its mask on the neighbour."""
    kwargs: dict[str, Any] = {"box": mask_box(previous, settings.box_margin)}
    if "point" in settings.projection:
        kwargs["point_coords"] = interior_point(previous)
        kwargs["point_labels"] = np.ones(1, dtype=np.int64)
    if "logits" in settings.projection and logits is not None:
        kwargs["mask_input"] = logits[None]
    masks, scores, low_res = predictor.predict(multimask_output=False, **kwargs)
    return np.asarray(masks[0], dtype=bool), float(scores[0]), low_res[0]


# -- propagation ---------------------------------------------------------------------------------
def _runs(anchor_slices: Sequence[int], n: int) -> list[tuple[int, list[int]]]:
    """(start anchor, slices to visit in order) for every direction: outwards from the first
    and last anchors, and towards the middle of every gap between two anchors."""
    runs = [(anchor_slices[0], list(range(anchor_slices[0] - 1, -1, -1)))]
    for a, b in zip(anchor_slices[:-1], anchor_slices[1:]):
        middle = (a + b) // 2
        runs.append((a, list(range(a + 1, middle + 1))))
        runs.append((b, list(range(b - 1, middle, -1))))
    runs.append((anchor_slices[-1], list(range(anchor_slices[-1] + 1, n))))
    return [run for run in runs if run[1]]


def _embedding(steps: Generator, done: int, total: int, index: int) -> Generator[VolumeProgress, None, Any]:
    """Run an embedding generator, yielding its steps as :class:`VolumeProgress`; returns the embedding."""
    try:
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                return stop.value
            yield VolumeProgress(done, total, index, int(step[0]), int(step[1]))
    finally:
        steps.close()


def default_embedder(predictor: Any, rgb_slice: Callable[[int], np.ndarray]) -> Callable[[int], Generator]:
    """Embeddings computed by ``predictor.embedding_steps`` on ``rgb_slice(i)`` (no cache)."""
    return lambda index: predictor.embedding_steps(rgb_slice(index))


def engine_embedder(
    engine: Any, rgb_slice: Callable[[int], np.ndarray], cache_key: Optional[Callable[[int], Any]] = None,
) -> Callable[[int], Generator]:
    """Embeddings from a :class:`~napari_sam.interactive.engine.SamEngine`: taken from its cache
    under ``cache_key(i)`` when there, else computed step by step (``engine.embedding_steps``,
    lock per step) and put in the cache (no cache without ``cache_key``)."""

    def embed(index: int) -> Generator[tuple[int, int], None, Any]:
        key = cache_key(index) if cache_key is not None else None
        cached = engine.cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        embedding = yield from engine.embedding_steps(rgb_slice(index))
        if key is not None:
            engine.cache.put(key, embedding)
        return embedding

    return embed


def propagation_steps(
    predictor: Any,
    n_slices: int,
    anchors: Mapping[int, np.ndarray],
    embed: Callable[[int], Generator[Any, None, Any]],
    settings: Optional[PropagationSettings] = None,
    anchor_logits: Optional[Mapping[int, np.ndarray]] = None,
) -> Generator[VolumeProgress, None, PropagationResult]:
    """Propagate an object from its anchor slices through the stack (see the module docstring).

    Args:
        predictor: a :class:`~napari_sam.SamPredictor`; its image is replaced slice by slice.
        n_slices: slices along the propagation axis.
        anchors: slice -> HxW bool mask of the object there (at least one, non-empty); kept as is.
        embed: slice -> a generator yielding progress and returning that slice's
            :class:`~napari_sam.predictor.ImageEmbedding` (e.g. :func:`default_embedder`, or
            a cache in front of ``SamEngine.embedding_steps``).
        settings: :class:`PropagationSettings` (default: the defaults).
        anchor_logits: optional slice -> low-res logits of an anchor (for the "logits" projections).

    Yields:
        :class:`VolumeProgress` after every step of every visited slice.

    Returns:
        :class:`PropagationResult`.

    Raises:
        ValueError: no anchor, an anchor out of range, empty or of another shape than the others.
    """
    settings = settings or PropagationSettings()
    if not anchors:
        raise ValueError("Propagation needs the object on at least one slice (anchors is empty).")
    shapes = {np.shape(mask) for mask in anchors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"Anchor masks must be HxW arrays of one shape, got shapes {sorted(shapes)}.")
    shape = next(iter(shapes))
    masks = np.zeros((n_slices, *shape), dtype=bool)
    for index, mask in anchors.items():
        if not 0 <= int(index) < n_slices:
            raise ValueError(f"Anchor slice {index} is out of range (0..{n_slices - 1}).")
        if not np.any(mask):
            raise ValueError(f"The anchor mask on slice {index} is empty.")
        masks[int(index)] = np.asarray(mask, dtype=bool)
    anchor_slices = sorted(int(i) for i in anchors)
    runs = _runs(anchor_slices, n_slices)
    total = sum(len(visit) for _, visit in runs)
    result = PropagationResult(masks)
    done = 0
    logits_of = dict(anchor_logits or {})
    for start, visit in runs:
        previous, logits = masks[start], logits_of.get(start)
        for position, index in enumerate(visit):
            embedding = yield from _embedding(embed(index), done, total, index)
            predictor.set_image_embedding(embedding)
            mask, score, low_res = _project(predictor, previous, logits, settings)
            overlap = iou(mask, previous)
            result.slices[index] = SliceResult(mask, score, overlap, low_res)
            done += 1
            reason = ("area" if mask.sum() < settings.min_area else "predicted_iou"
                      if score < settings.min_predicted_iou else "overlap" if overlap < settings.min_overlap else None)
            if reason is not None:
                result.stopped[index] = reason
                total -= len(visit) - position - 1
                yield VolumeProgress(done, total, index, 0, 0)
                break
            masks[index] = mask
            previous, logits = mask, low_res
            yield VolumeProgress(done, total, index, 0, 0)
    return result


# -- model and prompts ---------------------------------------------------------------------------
def resolve_predictor(model: Any) -> tuple[Any, str]:
    """A SamPredictor and the model's registry type (for AMG thresholds) from a ``model=`` argument:
    whatever :func:`napari_sam.models.create_model` takes, a ``Sam`` or a ``SamPredictor``."""
    from .models import as_spec, create_model, detect_model_type
    from .predictor import SamPredictor

    if isinstance(model, SamPredictor):
        predictor = model
    else:
        spec = as_spec(model)
        if spec is not None:
            model = create_model(spec.model_type, spec.checkpoint, spec.device)
        predictor = SamPredictor(model)
    try:
        model_type = detect_model_type(predictor.model.state_dict())
    except Exception:  # a model no registered architecture fits: default thresholds
        model_type = ""
    return predictor, model_type


def _check_prompts(point_coords: Any, point_labels: Any, box: Any, shape: tuple[int, int]) -> dict[str, Any]:
    h, w = shape
    kwargs: dict[str, Any] = {}
    if point_coords is not None and np.size(point_coords) == 0:
        point_coords = None
    if point_coords is None and point_labels is not None and np.size(point_labels):
        raise ValueError("point_labels given without point_coords.")
    if point_coords is not None:
        if np.size(point_coords) % 2:
            raise ValueError(f"point_coords must be Kx2 (x, y), got shape {np.shape(point_coords)}.")
        coords = np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
        labels = np.ones(len(coords), dtype=np.int64) if point_labels is None else np.asarray(point_labels)
        if labels.shape != (len(coords),):
            raise ValueError(f"point_labels must hold one label per point, got {labels.shape} for {len(coords)} points.")
        outside = (coords[:, 0] < -0.5) | (coords[:, 0] > w - 0.5) | (coords[:, 1] < -0.5) | (coords[:, 1] > h - 0.5)
        if outside.any():
            raise ValueError(f"Points {coords[outside].tolist()} (x, y) lie outside the slice of {w}x{h} pixels.")
        kwargs.update(point_coords=coords, point_labels=labels)
    if box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.size != 4:
            raise ValueError(f"box must be XYXY (4 values), got {np.shape(box)}.")
        if max(b[0], b[2]) < -0.5 or min(b[0], b[2]) > w - 0.5 or max(b[1], b[3]) < -0.5 or min(b[1], b[3]) > h - 0.5:
            raise ValueError(f"The box {b.tolist()} lies outside the slice of {w}x{h} pixels.")
        kwargs["box"] = b
    return kwargs


def segment_volume_steps(
    volume: Any,
    slice_index: int,
    *,
    point_coords: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask: Any = None,
    anchors: Optional[Mapping[int, np.ndarray]] = None,
    model: Any = "vit_small",
    axis: int = 0,
    contrast_limits: Optional[Sequence[float]] = None,
    settings: Optional[PropagationSettings] = None,
    engine: Any = None,
    cache_key: Optional[Callable[[int], Any]] = None,
) -> Generator[VolumeProgress, None, np.ndarray]:
    """The generator behind :func:`segment_volume` (same arguments; yields :class:`VolumeProgress`,
    returns the mask; ``close()`` cancels between two steps).

    Extra arguments for the napari plugin:
        anchors: slice -> HxW mask of the object on further slices (never overwritten).
        engine: a :class:`~napari_sam.interactive.engine.SamEngine` to use instead of
            ``model``: its model and embedding cache, its lock taken per step.
        cache_key: slice index -> the engine's cache key of that slice's embedding (e.g.
            ``lambda i: engine.cache_key(data_key, slice_spec_of(i).key, contrast_limits)``).
    """
    volume = VolumeSlices(volume, axis)
    n = len(volume)
    if not 0 <= int(slice_index) < n:
        raise ValueError(f"slice_index {slice_index} is out of range: {n} slices (0..{n - 1}) along axis {axis}.")
    slice_index = int(slice_index)
    shape = volume.plane_shape
    prompts = _check_prompts(point_coords, point_labels, box, shape)
    if mask is None and not prompts and not anchors:
        raise ValueError("segment_volume needs a prompt on the slice: point_coords, a box or a mask.")
    if mask is not None and np.shape(mask) != shape:
        raise ValueError(f"mask has shape {np.shape(mask)}; the slices are {shape}.")
    anchor_masks = {}
    for index, anchor in (anchors or {}).items():
        if not 0 <= int(index) < n or np.shape(anchor) != shape:
            raise ValueError(f"Anchor on slice {index} of shape {np.shape(anchor)}: expected 0..{n - 1} and {shape}.")
        anchor_masks[int(index)] = np.asarray(anchor, dtype=bool)
    rgb_slice = volume.rgb_reader(contrast_limits)
    if engine is not None:
        engine.ensure_model()
        predictor = engine.predictor
        embed = engine_embedder(engine, rgb_slice, cache_key)
    else:
        predictor, _ = resolve_predictor(model)
        embed = default_embedder(predictor, rgb_slice)

    def steps() -> Generator[VolumeProgress, None, np.ndarray]:
        anchor_logits: dict[int, np.ndarray] = {}
        if mask is not None and not prompts:
            anchor_masks[slice_index] = np.asarray(mask, dtype=bool)
        elif prompts or mask is not None:
            embedding = yield from _embedding(embed(slice_index), 0, n - 1, slice_index)
            predictor.set_image_embedding(embedding)
            kwargs = dict(prompts)
            single_point = "box" not in kwargs and len(kwargs.get("point_coords", ())) == 1 and mask is None
            if mask is not None:
                kwargs["mask_input"] = _mask_to_logits(predictor, np.asarray(mask, dtype=bool))[None]
            out, scores, low_res = predictor.predict(multimask_output=single_point, **kwargs)
            best = int(np.argmax(scores))
            if not out[best].any():
                raise ValueError(f"The prompts give an empty mask on slice {slice_index}.")
            anchor_masks[slice_index] = np.asarray(out[best], dtype=bool)
            anchor_logits[slice_index] = low_res[best]
        result = yield from propagation_steps(predictor, n, anchor_masks, embed, settings, anchor_logits)
        return volume.stack(result.masks)

    if engine is not None:
        return (yield from engine.locked(steps()))
    return (yield from steps())


def _mask_to_logits(predictor: Any, mask: np.ndarray, scale: float = 8.0) -> np.ndarray:
    """A boolean HxW mask as low-res logits in SAM's mask-input frame (``+scale`` inside)."""
    import torch
    import torch.nn.functional as F

    side = predictor.model.image_encoder.img_size
    h, w = predictor.input_size
    tensor = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    tensor = F.interpolate(tensor, (h, w), mode="bilinear", align_corners=False)
    tensor = F.pad(tensor, (0, side - w, 0, side - h))
    tensor = F.interpolate(tensor, tuple(predictor.model.prompt_encoder.mask_input_size), mode="area")
    return ((tensor[0, 0] * 2 - 1) * scale).numpy()


def segment_volume(
    volume: np.ndarray,
    slice_index: int,
    *,
    point_coords: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask: Any = None,
    model: Any = "vit_small",
    axis: int = 0,
    contrast_limits: Optional[Sequence[float]] = None,
    progress: Optional[ProgressCallback] = None,
    settings: Optional[PropagationSettings] = None,
    anchors: Optional[Mapping[int, np.ndarray]] = None,
) -> np.ndarray:
    """Segment one object through a volume from prompts on one slice.

    The prompts give the object's mask on ``slice_index`` (best of SAM's three masks for a
    single point); that mask is then propagated to the neighbouring slices in both directions
    until the object ends (see the module docstring for the projection and the stopping rules).

    Args:
        volume: (N, H, W) of any real dtype, or (N, H, W, 3|4) RGB(A); N runs along ``axis``.
        slice_index: the slice the prompts are on (along ``axis``).
        point_coords: Kx2 (x, y) pixel coordinates on that slice, as in ``SamPredictor``.
        point_labels: K labels, 1 positive, 0 negative (default: all positive).
        box: XYXY box on that slice.
        mask: HxW bool mask of the object on that slice: used as the anchor as is when no
            points or box are given, else as SAM's mask input with them.
        model: a registry type or checkpoint path (what ``napari_sam.models.create_model``
            takes), a ``Sam`` or a ``SamPredictor``.
        axis: the propagation axis of the spatial axes (0: z of a stack, or t of a time-lapse).
        contrast_limits: (low, high) mapped to [0, 255] for non-uint8 volumes; default the
            0.5th and 99.5th percentiles of the whole volume (one mapping for all slices).
        progress: called with every :class:`VolumeProgress`.
        settings: :class:`PropagationSettings`.
        anchors: slice -> HxW bool mask of the object on further slices (never overwritten).

    Returns:
        bool array of the volume's spatial shape (RGB volumes (N, H, W, 3) give (N, H, W)).

    Raises:
        ValueError: a 2-D image, ``slice_index`` out of range, prompts outside the slice, no
            prompt, or prompts that give an empty mask.
    """
    return drain(segment_volume_steps(
        volume, slice_index, point_coords=point_coords, point_labels=point_labels, box=box, mask=mask,
        anchors=anchors, model=model, axis=axis, contrast_limits=contrast_limits, settings=settings), progress)


# -- automatic 3-D -------------------------------------------------------------------------------
OBJECT_COLUMNS = ("label", "first_slice", "last_slice", "slices", "voxels", "mean_predicted_iou")


@dataclass(frozen=True)
class LinkSettings:
    """How per-slice masks are linked into 3-D objects (:func:`link_slices`).

    Attributes:
        min_iou: two masks on neighbouring slices (or across a gap) belong to one object only
            when their IoU is at least this (default 0.3).
        max_gap: an object may miss up to this many slices and continue (default 1); the
            missing slices are filled with the intersection of the masks on both sides.
        min_extent: objects spanning fewer slices are dropped (default 2).
        max_area_fraction: per-slice masks covering more than this fraction of the slice are
            dropped before linking (the background; default 0.5).
        fragment_fraction: a mask left unmatched that lies at least this fraction inside the
            previous mask of an object continued on the slice is joined to that object there
            (SAM gave a piece of the object as well as the whole; default 0.5).
    """

    min_iou: float = 0.3
    max_gap: int = 1
    min_extent: int = 2
    max_area_fraction: float = 0.5
    fragment_fraction: float = 0.5


@dataclass(eq=False)
class _Track:
    label: int
    last_slice: int
    last_mask: np.ndarray
    slices: dict[int, np.ndarray] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)


def link_slices(
    slices: Sequence[Sequence[tuple[np.ndarray, float]]],
    shape: tuple[int, int],
    settings: Optional[LinkSettings] = None,
) -> tuple[np.ndarray, dict[str, list]]:
    """Link per-slice masks into 3-D objects.

    Rule: slices are visited in order. Masks covering more than ``max_area_fraction`` of the
    slice are dropped. Each open object (seen on one of the last ``max_gap + 1`` slices) is
    compared with every mask of the slice by IoU with its last mask;
    :func:`scipy.optimize.linear_sum_assignment` maximises the total IoU (a gap of g slices
    costs g * 0.01, so the most recent object wins ties); pairs with IoU >= ``min_iou``
    continue their object. A mask left unmatched that lies mostly (``fragment_fraction`` of
    its pixels) inside a mask matched on this slice, or inside that object's previous mask, is
    joined to that object (SAM gave a piece of it as well as the whole); other masks start new
    objects. The slices of a gap are filled with the intersection of the masks on both sides.
    Objects spanning fewer than ``min_extent`` slices are dropped; ids are 1..K in the order
    of their first slice. Each slice is then painted with
    :func:`~napari_sam.utils.labels.paint_masks` (where objects overlap the smaller stays).

    Args:
        slices: per slice, (HxW bool mask, predicted IoU) pairs.
        shape: (H, W).
        settings: :class:`LinkSettings`.

    Returns:
        (N, H, W) uint32 labels and the objects table (:data:`OBJECT_COLUMNS`).
    """
    from scipy.optimize import linear_sum_assignment

    settings = settings or LinkSettings()
    limit = settings.max_area_fraction * shape[0] * shape[1]
    tracks: list[_Track] = []
    for z, records in enumerate(slices):
        segments = [(np.asarray(m, dtype=bool), float(s)) for m, s in records]
        segments = [(m, s) for m, s in segments if 0 < m.sum() <= limit]
        open_tracks = [t for t in tracks if z - t.last_slice <= settings.max_gap + 1]
        matched: dict[int, _Track] = {}
        previous: dict[int, np.ndarray] = {}  # matched segment -> its object's previous mask
        if open_tracks and segments:
            ious = np.array([[iou(t.last_mask, m) for m, _ in segments] for t in open_tracks])
            gaps = np.array([[z - t.last_slice - 1] * len(segments) for t in open_tracks])
            rows, cols = linear_sum_assignment(-ious + 0.01 * gaps)
            for i, j in zip(rows, cols):
                if ious[i, j] >= settings.min_iou:
                    track = open_tracks[i]
                    mask, score = segments[j]
                    previous[j] = track.last_mask
                    for k in range(track.last_slice + 1, z):
                        track.slices[k] = np.logical_and(track.last_mask, mask)
                    track.slices[z] = mask
                    track.scores.append(score)
                    track.last_slice, track.last_mask = z, mask
                    matched[j] = track
        hosts = list(matched)
        for j, (mask, score) in enumerate(segments):
            if j in matched:
                continue
            area = mask.sum()
            inside = [(max(np.logical_and(segments[h][0], mask).sum(), np.logical_and(previous[h], mask).sum()), h)
                      for h in hosts]
            best = max(inside, default=(0, -1))
            if best[0] >= settings.fragment_fraction * area:
                track = matched[best[1]]
                track.slices[z] = track.slices[z] | mask
                track.last_mask = track.slices[z]
                continue
            tracks.append(_Track(0, z, mask, {z: mask}, [score]))
    kept = sorted((t for t in tracks if max(t.slices) - min(t.slices) + 1 >= settings.min_extent),
                  key=lambda t: min(t.slices))
    labels = np.zeros((len(slices), *shape), dtype=np.uint32)
    for z in range(len(slices)):
        present = [(label, t.slices[z]) for label, t in enumerate(kept, start=1) if z in t.slices]
        if present:
            labels[z] = paint_masks([m for _, m in present], shape, [label for label, _ in present], dtype=np.uint32)
    table: dict[str, list] = {name: [] for name in OBJECT_COLUMNS}
    voxels = np.bincount(labels.reshape(-1), minlength=len(kept) + 1)
    for label, track in enumerate(kept, start=1):
        row = (label, min(track.slices), max(track.slices), len(track.slices), int(voxels[label]),
               float(np.mean(track.scores)))
        for name, value in zip(OBJECT_COLUMNS, row):
            table[name].append(value)
    return labels, table


def automatic_volume_steps(
    volume: np.ndarray,
    *,
    model: Any = "vit_small",
    axis: int = 0,
    settings: Any = None,
    link: Optional[LinkSettings] = None,
    contrast_limits: Optional[Sequence[float]] = None,
) -> Generator[VolumeProgress, None, tuple[np.ndarray, dict[str, list]]]:
    """The generator behind :func:`segment_volume_automatic`: yields :class:`VolumeProgress`
    after every point batch, returns (labels, objects table)."""
    from .amg_settings import AmgSettings
    from .automatic_mask_generator import SamAutomaticMaskGenerator

    volume = VolumeSlices(volume, axis)
    n = len(volume)
    predictor, model_type = resolve_predictor(model)
    if settings is None:
        settings = AmgSettings.for_model(model_type) if model_type else AmgSettings()
    settings = settings.replace(output_mode="binary_mask")
    generator = SamAutomaticMaskGenerator(predictor.model, settings=settings, precision=predictor.precision)
    rgb_slice = volume.rgb_reader(contrast_limits)
    per_slice = []
    for z in range(n):
        steps = generator.generate_iter(rgb_slice(z))
        try:
            while True:
                try:
                    p = next(steps)
                except StopIteration as stop:
                    records = stop.value
                    break
                yield VolumeProgress(z, n, z, p.done, p.total)
        finally:
            steps.close()
        per_slice.append([(r["segmentation"], r["predicted_iou"]) for r in records])
        yield VolumeProgress(z + 1, n, z, 0, 0)
    labels, table = link_slices(per_slice, volume.plane_shape, link)
    return volume.stack(labels), table


def segment_volume_automatic(
    volume: np.ndarray,
    *,
    model: Any = "vit_small",
    axis: int = 0,
    settings: Any = None,
    progress: Optional[ProgressCallback] = None,
    link: Optional[LinkSettings] = None,
    contrast_limits: Optional[Sequence[float]] = None,
    return_table: bool = False,
) -> Any:
    """Segment every object of a volume automatically, with one id per 3-D object.

    The automatic mask generator runs on every slice (``settings``: an
    :class:`~napari_sam.AmgSettings`, default ``AmgSettings.for_model`` of the model's type),
    then :func:`link_slices` links the masks across slices (IoU assignment, gap closing,
    minimum extent: :class:`LinkSettings`).

    Args:
        volume: (N, H, W) of any real dtype or (N, H, W, 3|4) RGB(A); N runs along ``axis``.
        model: as :func:`segment_volume`.
        axis: the slicing axis.
        settings: AMG settings.
        progress: called with every :class:`VolumeProgress`.
        link: :class:`LinkSettings`.
        contrast_limits: as :func:`segment_volume` (one mapping for the whole volume).
        return_table: also return the objects table (:data:`OBJECT_COLUMNS`: id, first and
            last slice, slices, voxel count, mean predicted IoU).

    Returns:
        uint32 labels of the volume's spatial shape (and the table with ``return_table``).

    Raises:
        ValueError: not a 3-D (or RGB 3-D) volume.
    """
    labels, table = drain(automatic_volume_steps(volume, model=model, axis=axis, settings=settings, link=link,
                                                 contrast_limits=contrast_limits), progress)
    return (labels, table) if return_table else labels
