"""Known SAM weights and ``build_sam``: the public names of the weights files and of model loading.

The mechanics (cache folder, verified downloads, mirrors) are in
:mod:`napari_sam.models.weights`; which weights exist, and how a choice becomes a model, in the
model registry (:mod:`napari_sam.models`). This module keeps the documented names in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from .models import registry
from .models.registry import ProgressCallback, default_model_type
from .models.weights import (
    CACHE_DIR_ENV,
    DOWNLOAD_TIMEOUT_S,
    KNOWN_WEIGHTS,
    MIRROR_ENV,
    WEIGHTS_ALIASES,
    DownloadError,
    HashMismatchError,
    KnownWeights,
    download_url,
    fetch_weights,
    get_cache_dir,
    known_weights,
    register_weights,
    resolve_checkpoint,
)
from .models.zoo import SMALL_MODEL_AMG_HIGH_RECALL, SMALL_MODEL_AMG_THRESHOLDS, SMALL_MODEL_FILE, SMALL_MODEL_HASH

if TYPE_CHECKING:
    import os

    import torch

    from .modeling import Sam

PathLike = Union[str, "os.PathLike[str]"]


def recommended_amg_thresholds(model_type: str) -> dict[str, float]:
    """Automatic-mask thresholds to use instead of the reference's defaults for a model type
    (e.g. :data:`SMALL_MODEL_AMG_THRESHOLDS` for ``"vit_small"``; empty for the official types).
    See :func:`napari_sam.models.amg_thresholds`."""
    return registry.amg_thresholds(model_type)


def default_device() -> "torch.device":
    """The device ``"auto"`` means here (see :func:`napari_sam.models.resolve_device`)."""
    import torch

    return torch.device(registry.resolve_device("auto"))


def build_sam(
    model_type: Optional[str] = None,
    checkpoint: Optional[PathLike] = None,
    device: Union[str, "torch.device", None] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    mirror: Optional[str] = None,
    progressbar: bool = True,
    progress_callback: Optional[ProgressCallback] = None,
) -> "Sam":
    """Build a SAM with weights, in eval mode, on ``device``.

    Without ``checkpoint``, loads the known weights of ``model_type`` from the cache folder,
    downloading them when missing (the bundled ``vit_small`` is never downloaded). With
    ``checkpoint``, the model type is detected from the tensor shapes, so
    ``build_sam(checkpoint=path)`` (the reference's call style) is enough; a ``model_type`` that
    disagrees with the file raises :class:`CheckpointError` (nothing is built). For
    compatibility with the reference's ``build_sam(path)``, a first argument that is a file
    path is taken as ``checkpoint``. Same as :func:`napari_sam.models.create_model`.

    Args:
        model_type: a type of :func:`napari_sam.models.model_types` (``"vit_b"``, ``"vit_l"``,
            ``"vit_h"``, ``"vit_small"``), ``"default"`` (= vit_h), another known weights name,
            or None: :func:`default_model_type` (cached official weights, else the bundled small
            model) without a checkpoint, detected with one.
        checkpoint: path of a PyTorch checkpoint holding a SAM state dict.
        device: where to put the model; None means "auto" (CUDA, then MPS, then the CPU).
        cache_dir, mirror, progressbar, progress_callback: see :func:`fetch_weights`.

    Returns:
        The model (``napari_sam.modeling.Sam``), in eval mode.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        CheckpointError: the file is not a SAM checkpoint of a known type, or holds another
            type than ``model_type``.
        KeyError: no known weights for ``model_type``.
        DownloadError, HashMismatchError: see :func:`fetch_weights`.
    """
    return registry.create_model(
        model_type, checkpoint, device, cache_dir=cache_dir, mirror=mirror, progressbar=progressbar,
        progress_callback=progress_callback,
    )


__all__ = [
    "CACHE_DIR_ENV",
    "DOWNLOAD_TIMEOUT_S",
    "DownloadError",
    "HashMismatchError",
    "KNOWN_WEIGHTS",
    "KnownWeights",
    "MIRROR_ENV",
    "SMALL_MODEL_AMG_HIGH_RECALL",
    "SMALL_MODEL_AMG_THRESHOLDS",
    "SMALL_MODEL_FILE",
    "SMALL_MODEL_HASH",
    "WEIGHTS_ALIASES",
    "build_sam",
    "default_device",
    "default_model_type",
    "download_url",
    "fetch_weights",
    "get_cache_dir",
    "known_weights",
    "recommended_amg_thresholds",
    "register_weights",
    "resolve_checkpoint",
]
