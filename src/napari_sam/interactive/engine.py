"""The interactive segmentation engine: one model, a bounded embedding cache, predictions.

Qt-free and napari-free: the napari widget drives it from thread workers, ``napari_sam.segment``
drives it synchronously, tests drive it directly.

* :func:`load_model` is the one place that turns a model choice into a ``Sam`` module
  (registry type + optional checkpoint path; the known-weights downloader plugs in here).
* :class:`EmbeddingCache` keeps image embeddings keyed by (layer data identity and version,
  slice, display mapping, model), least recently used first out, bounded in bytes.
* :class:`SamEngine` computes an embedding as a generator that yields progress after every
  encoder block (so a thread worker can report progress and be stopped between blocks) and
  predicts one mask per :class:`~napari_sam.interactive.prompts.ObjectPrompt`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generator, Hashable, Optional, Sequence, Union

import numpy as np

from ..utils.image import to_rgb_uint8
from .prompts import ObjectPrompt

_logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
SMALL_OFFLINE_MODEL = "vit_test"  # random weights, seeded: for tests
DEFAULT_CACHE_BYTES = 512 * 2**20  # ~128 vit_b embeddings (1x256x64x64 float32 = 4 MiB each)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelSpec:
    """Which SAM to load.

    Attributes:
        model_type: registry type ("vit_small", "vit_b", "vit_l", "vit_h", "vit_test"); with a checkpoint it
            may be "auto" (detected from the tensor shapes).
        checkpoint: path of a ``.pth`` state dict, or None: known weights for the type (through
            ``napari_sam.checkpoints``; ``vit_small`` is bundled in the package), or random
            weights for ``vit_test`` (seeded, for tests and demos).
        device: "auto" (CUDA, then Apple MPS, then CPU), "cpu", "cuda" or "mps".
        precision: "fp32", "bf16" or "fp16", see :class:`napari_sam.SamPredictor`.
    """

    model_type: str = "vit_small"
    checkpoint: Optional[str] = None
    device: str = "auto"
    precision: str = "fp32"

    @property
    def label(self) -> str:
        name = os.path.basename(self.checkpoint) if self.checkpoint else "known weights"
        if self.model_type == SMALL_OFFLINE_MODEL and not self.checkpoint:
            name = "random weights"
        return f"{self.model_type} ({name})"


def resolve_device(device: str = "auto") -> str:
    """Turn "auto" into the best available torch device name.

    Raises:
        ValueError: unknown device name, or a device that is not available here.
    """
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cuda" and not cuda:
        raise ValueError("device 'cuda' was chosen but torch sees no CUDA GPU; choose 'auto' or 'cpu'.")
    if device == "mps" and not mps:
        raise ValueError("device 'mps' was chosen but Apple MPS is not available; choose 'auto' or 'cpu'.")
    return device


def load_model(spec: ModelSpec, progress: Optional[ProgressCallback] = None) -> Any:
    """Build the SAM described by ``spec`` on its device, in eval mode.

    Args:
        spec: the model choice.
        progress: called as ``progress(downloaded_bytes, total_bytes)`` while known weights
            are downloaded (only when ``napari_sam.checkpoints`` provides them).

    Returns:
        a ``napari_sam.modeling.Sam``.

    Raises:
        FileNotFoundError, napari_sam.CheckpointError: a bad checkpoint file.
        KeyError: unknown model type.
        RuntimeError: known weights requested but no way to get them (no checkpoint file and
            no ``napari_sam.checkpoints`` module).
    """
    import torch

    from ..build import build_sam_type, detect_model_type, read_state_dict

    device = resolve_device(spec.device)
    model_type = spec.model_type
    if spec.checkpoint:
        if model_type == "auto":
            model_type = detect_model_type(read_state_dict(spec.checkpoint))
        model = build_sam_type(model_type, spec.checkpoint)
    elif model_type == SMALL_OFFLINE_MODEL:
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            model = build_sam_type(model_type)
        finally:
            torch.random.set_rng_state(state)
    else:
        model = _load_known_weights(model_type, device, progress)
    return model.to(device).eval()


def _load_known_weights(model_type: str, device: str, progress: Optional[ProgressCallback]) -> Any:
    """Known official weights through ``napari_sam.checkpoints.build_sam`` (cached, verified download)."""
    try:
        from .. import checkpoints  # type: ignore[attr-defined]
    except ImportError:
        raise RuntimeError(
            f"No checkpoint file given for {model_type} and this install cannot download known weights; "
            "choose a checkpoint file (e.g. sam_vit_b_01ec64.pth) or the small offline model."
        ) from None
    build = getattr(checkpoints, "build_sam")
    try:
        return build(model_type, checkpoint=None, device=device, progressbar=False, progress_callback=progress)
    except TypeError:  # an older build_sam without the progress arguments
        return build(model_type, checkpoint=None, device=device)


@dataclass
class Embedding:
    """A slice's image embedding, enough to predict masks without the image.

    Attributes:
        features: 1x256x64x64 float32 torch tensor on the model's device.
        original_size: (H, W) of the slice.
        input_size: (h, w) of the slice resized to long side 1024, before padding.
    """

    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.features.element_size() * self.features.nelement())


class EmbeddingCache:
    """Least-recently-used cache of :class:`Embedding` objects, bounded in bytes.

    Keys are any hashables; :meth:`SamEngine.cache_key` builds the ones the plugin uses.

    Args:
        max_bytes: evict least recently used embeddings beyond this total size (at least
            the newest one is always kept).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Embedding] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Embedding]:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: Hashable, embedding: Embedding) -> None:
        with self._lock:
            self._items[key] = embedding
            self._items.move_to_end(key)
            while len(self._items) > 1 and self.nbytes > self.max_bytes:
                self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def display_rgb(plane: np.ndarray, contrast_limits: Optional[Sequence[float]], rgb: bool) -> np.ndarray:
    """The slice as napari displays it, as SAM's HxWx3 uint8 RGB input.

    Intensities are mapped linearly from the layer's contrast limits ``(low, high)`` to
    [0, 255] (gamma and colormap are ignored). uint8 data whose contrast limits are the full
    (0, 255) range is passed unchanged, so photos give exactly the reference's input.

    Args:
        plane: HxW (grayscale) or HxWx3 / HxWx4 (``rgb``) slice, any real dtype.
        contrast_limits: the layer's (low, high), or None for robust percentiles.
        rgb: the trailing axis holds colour channels.

    Returns:
        HxWx3 uint8.
    """
    plane = np.asarray(plane)
    if not rgb and plane.ndim != 2:
        raise ValueError(f"Expected a 2-D grayscale slice, got shape {plane.shape}.")
    if rgb and (plane.ndim != 3 or plane.shape[2] not in (3, 4)):
        raise ValueError(f"Expected an HxWx3 or HxWx4 RGB(A) slice, got shape {plane.shape}.")
    limits = None if contrast_limits is None else (float(contrast_limits[0]), float(contrast_limits[1]))
    if plane.dtype == np.uint8 and (limits is None or limits == (0.0, 255.0)):
        return to_rgb_uint8(plane)
    if limits is not None and not limits[1] > limits[0]:
        limits = (limits[0], limits[0] + 1.0)
    if plane.dtype == np.uint8:
        plane = plane.astype(np.float32)
    return to_rgb_uint8(plane, limits)


class SamEngine:
    """One model, its embedding cache, and mask predictions for object prompts.

    Thread use: all model work takes ``self.lock``; one thread at a time computes. The
    embedding generator holds the lock between its yields.

    Args:
        spec: the model to load lazily (on first use) or None to set one later.
        model: an already built ``Sam`` module to use instead of loading ``spec``.
        cache_bytes: bound of the embedding cache.
    """

    def __init__(
        self,
        spec: Optional[ModelSpec] = None,
        model: Any = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        import torch

        self.spec = spec
        self.model = model
        self.cache = EmbeddingCache(cache_bytes)
        self.lock = threading.RLock()
        self.embeddings_computed = 0
        self._model_serial = 0 if model is None else 1
        # torch's intra-op thread count as set in the thread that made the engine; worker
        # threads may start with a different one (napari issue seen in micro-sam #740).
        self.num_threads = torch.get_num_threads()

    # -- model --------------------------------------------------------------------------------
    def set_spec(self, spec: ModelSpec) -> None:
        """Choose another model; it is loaded on next use and the cache is dropped."""
        with self.lock:
            if spec != self.spec or self.model is None:
                self.spec = spec
                self.model = None
                self.cache.clear()

    def set_model(self, model: Any) -> None:
        """Use an already built ``Sam`` module."""
        with self.lock:
            self.model = model
            self.spec = None
            self._model_serial += 1
            self.cache.clear()

    @property
    def needs_loading(self) -> bool:
        return self.model is None

    def ensure_model(self, progress: Optional[ProgressCallback] = None) -> Any:
        """Load the chosen model if needed and return it.

        Raises:
            RuntimeError: no model chosen; and whatever :func:`load_model` raises.
        """
        with self.lock:
            if self.model is None:
                if self.spec is None:
                    raise RuntimeError("No SAM model chosen.")
                self.adopt_thread_settings()
                self.model = load_model(self.spec, progress)
                self._model_serial += 1
            return self.model

    def adopt_thread_settings(self) -> None:
        """Give the calling thread the same torch intra-op thread count as the creating thread."""
        import torch

        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    @property
    def model_key(self) -> Hashable:
        return (self.spec, self._model_serial)

    def cache_key(self, data_key: Hashable, slice_key: Hashable, contrast_limits: Any) -> Hashable:
        """Embedding cache key: layer data identity and version, slice, display mapping, model."""
        limits = None if contrast_limits is None else tuple(float(v) for v in contrast_limits)
        return (data_key, slice_key, limits, self.model_key)

    # -- embeddings ---------------------------------------------------------------------------
    def embedding_steps(self, rgb: np.ndarray) -> Generator[tuple[int, int], None, Embedding]:
        """Compute the image embedding of an HxWx3 uint8 RGB image, block by block.

        Yields ``(steps_done, steps_total)`` after resizing and after every encoder block, so
        a thread worker can show progress and stop between blocks; returns the
        :class:`Embedding` (``StopIteration.value``). The result is bitwise the same as
        ``SamPredictor.set_image(rgb)`` (same modules, same order). The lock and torch's
        no-grad mode are taken per step, never across a yield, so an abandoned generator
        leaves nothing locked.
        """
        import torch

        from ..predictor import SamPredictor

        with self.lock:
            self.adopt_thread_settings()
            model = self.ensure_model()
            predictor = SamPredictor(model, precision=self._precision)
            encoder = model.image_encoder
            total = len(encoder.blocks) + 2
            resized = predictor.transform.apply_image(np.ascontiguousarray(rgb))
            tensor = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()[None]
            input_size = tuple(int(v) for v in tensor.shape[-2:])
            with torch.no_grad():
                x = model.preprocess(tensor)
        yield 1, total
        with self.lock, torch.no_grad(), predictor._autocast():
            x = encoder.patch_embed(x)
            if encoder.pos_embed is not None:
                x = x + encoder.pos_embed
        for i, block in enumerate(encoder.blocks):
            with self.lock, torch.no_grad(), predictor._autocast():
                x = block(x)
            yield i + 2, total
        with self.lock, torch.no_grad(), predictor._autocast():
            features = encoder.neck(x.permute(0, 3, 1, 2)).float()
        self.embeddings_computed += 1
        return Embedding(features, tuple(int(v) for v in rgb.shape[:2]), input_size)

    @property
    def embedding_step_count(self) -> int:
        model = self.ensure_model()
        return len(model.image_encoder.blocks) + 2

    def embed(self, rgb: np.ndarray, key: Optional[Hashable] = None) -> Embedding:
        """The embedding of ``rgb`` (HxWx3 uint8), from the cache under ``key`` when there."""
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        embedding = drain(self.embedding_steps(rgb))
        if key is not None:
            self.cache.put(key, embedding)
        return embedding

    @property
    def _precision(self) -> str:
        return self.spec.precision if self.spec is not None else "fp32"

    # -- predictions --------------------------------------------------------------------------
    def predictor_for(self, embedding: Embedding) -> Any:
        """A ``SamPredictor`` whose image is ``embedding`` (no encoder work)."""
        from ..predictor import SamPredictor

        predictor = SamPredictor(self.ensure_model(), precision=self._precision)
        predictor.features = embedding.features
        predictor.original_size = tuple(embedding.original_size)
        predictor.input_size = tuple(embedding.input_size)
        predictor.orig_h, predictor.orig_w = predictor.original_size
        predictor.input_h, predictor.input_w = predictor.input_size
        predictor.is_image_set = True
        return predictor

    def predict_objects(self, embedding: Embedding, objects: Sequence[ObjectPrompt]) -> list[np.ndarray]:
        """One HxW bool mask per object (the best of 3 for a single point, else the only one).

        Each object runs through ``SamPredictor.predict`` with ``ObjectPrompt.predict_kwargs``.
        """
        with self.lock:
            self.adopt_thread_settings()
            predictor = self.predictor_for(embedding)
            masks = []
            for obj in objects:
                out, scores, _ = predictor.predict(**obj.predict_kwargs())
                masks.append(np.asarray(out[int(np.argmax(scores))], dtype=bool))
            return masks


def drain(generator: Generator[Any, None, Any]) -> Any:
    """Run a progress generator to the end and return its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def objects_to_labels(masks: Sequence[np.ndarray], shape: tuple[int, int], dtype: Any = np.uint32) -> np.ndarray:
    """Paint masks into an HxW label image with ids 1..K (later masks over earlier ones)."""
    labels = np.zeros(shape, dtype=dtype)
    for i, mask in enumerate(masks, start=1):
        labels[np.asarray(mask, dtype=bool)] = i
    return labels


SpecOrModel = Union[ModelSpec, str, "os.PathLike[str]", Any]


def as_spec(model: SpecOrModel, device: str = "auto") -> Optional[ModelSpec]:
    """Interpret a ``model=`` argument: a ModelSpec, a registry type, or a checkpoint path.

    Returns None for a ``Sam`` module or a ``SamPredictor`` (use them directly).

    Raises:
        ValueError: a string that is neither a registry type nor an existing file.
    """
    from ..build import MODEL_CONFIGS

    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if text in MODEL_CONFIGS or text == "default":
            return ModelSpec("vit_h" if text == "default" else text, None, device)
        if os.path.isfile(text):
            return ModelSpec("auto", text, device)
        raise ValueError(
            f"model must be a registry type ({', '.join(MODEL_CONFIGS)}), a checkpoint file, a Sam module "
            f"or a SamPredictor; {text!r} is none of these."
        )
    return None
