"""What a failed background job tells the user (Qt-free, napari-free).

:meth:`napari_sam._napari._session.SegmentationSession.run` turns every exception of a worker
into one message from :func:`describe_error`, shown in the widget's status area and as a
napari notification; the full traceback goes to the log.
"""

from __future__ import annotations

import sys

from ..embedding_store import StoreMismatchError
from ..models.state_dict import CheckpointError
from ..models.weights import DownloadError, HashMismatchError

OUT_OF_MEMORY_ADVICE = (
    "Try a smaller model (e.g. vit_small or vit_b), the CPU device, bf16 precision or a smaller image, "
    "or close other programs that use the memory; then run again."
)
DOWNLOAD_ADVICE = "Choose another model (e.g. the bundled vit_small) to continue working."
STORE_ADVICE = (
    "In the widget: tick 'Recompute mismatched embeddings' to replace them, choose another store, "
    "or clear the 'Embeddings store' field."
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that memory ran out (torch's GPU / MPS / CPU allocators, Python)."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe_error(error: BaseException) -> str:
    """A whole, self-contained message for the user about a failed job.

    Args:
        error: the exception the job raised.

    Returns:
        For a download failure: why, and where a hand-downloaded file goes (the
        :class:`~napari_sam.models.weights.DownloadError` message) and what to do now; for
        running out of memory: what to change; for a bad checkpoint: why; for anything else
        (a bug): the exception's type and message; for an embedding store that does not fit:
        what differs and how to go on.
    """
    text = str(error).strip()
    if isinstance(error, HashMismatchError):
        return f"The model weights failed their hash check: {text}"
    if isinstance(error, DownloadError):
        return f"The model weights could not be downloaded. {text}\n{DOWNLOAD_ADVICE}"
    if is_out_of_memory(error):
        first_line = text.splitlines()[0] if text else type(error).__name__
        return f"Out of memory: {first_line}\n{OUT_OF_MEMORY_ADVICE}"
    if isinstance(error, StoreMismatchError):
        return f"{text}\n{STORE_ADVICE}"
    if isinstance(error, (CheckpointError, FileNotFoundError)):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
