"""Known SAM weights: cache folder, verified downloads with progress, mirrors, ``build_sam``.

Where files live:
    One folder holds every known weights file under its published file name. It is, in
    order of precedence, the ``cache_dir`` argument, the ``NAPARI_SAM_CACHE_DIR``
    environment variable, or the platform's user cache folder for napari-sam
    (``platformdirs.user_cache_path("napari-sam")``, e.g. ``~/.cache/napari-sam`` on Linux).
    A file copied there by hand (no network at all) is picked up like a downloaded one.

How a cached file is trusted without re-hashing it:
    After a file's xxh128 hash has been checked (right after its download, or the first
    time a hand-copied file is used) a small sidecar ``<file name>.verified`` is written
    next to it, holding the expected hash and the file's size and modification time
    (ns). Later calls compare those three values with ``os.stat`` and the registry entry
    and make no network request and read no weights. Any change to the file (size or
    mtime) or to the registry hash makes the sidecar stale, and the file is hashed again.
    A read-only cache folder works too; the file is then hashed on every use.

How downloads happen:
    With pooch: the file streams into a temporary file in the cache folder, its hash is
    checked, and only then is it moved to its final name. A hash mismatch, a dropped
    connection or a progress callback that raises leaves nothing behind. Progress goes to
    a terminal bar (tqdm) and/or to a callback ``(downloaded_bytes, total_bytes)`` that a
    napari widget turns into napari progress.

Mirrors:
    ``NAPARI_SAM_MIRROR`` (or the ``mirror`` argument) is a base URL; the file is fetched
    from ``<mirror>/<file name>`` instead of its official URL, with the same hash check.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

if TYPE_CHECKING:  # torch is imported only when a model is built
    import torch

    from .modeling import Sam

_logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, int], None]

CACHE_DIR_ENV = "NAPARI_SAM_CACHE_DIR"
MIRROR_ENV = "NAPARI_SAM_MIRROR"
APP_NAME = "napari-sam"
VERIFIED_SUFFIX = ".verified"
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """Weights could not be downloaded (no network, server down, HTTP error, dropped transfer)."""


class HashMismatchError(DownloadError):
    """A weights file does not have its known hash (corrupt transfer or wrong file)."""


@dataclass(frozen=True)
class KnownWeights:
    """One downloadable weights file.

    Attributes:
        name: registry key, e.g. ``"vit_b"``.
        model_type: the ``sam_model_registry`` type these weights load into.
        filename: file name in the cache folder and on mirrors.
        url: official download URL.
        known_hash: ``"<algorithm>:<hex digest>"`` as pooch reads it, e.g. ``"xxh128:..."``.
        description: one line for menus and messages.
        bundled: path of a copy shipped inside the package (loaded offline, never
            downloaded or copied to the cache), or None.
    """

    name: str
    model_type: str
    filename: str
    url: str
    known_hash: str
    description: str = ""
    bundled: Optional[Path] = None


_OFFICIAL = "https://dl.fbaipublicfiles.com/segment_anything/"

# The project's own small model (type "vit_small"), trained by scripts/train_small_model.py
# and stored in the package: it loads offline, with no download.
SMALL_MODEL_FILE = Path(__file__).resolve().parent / "weights" / "sam_vit_small.pth"

#: Known weights by name. Later entries (a small project model, MobileSAM) go through
#: :func:`register_weights`; the first entry of a model type is that type's default.
KNOWN_WEIGHTS: dict[str, KnownWeights] = {}


def register_weights(entry: KnownWeights, *, replace: bool = False) -> KnownWeights:
    """Add a weights file to :data:`KNOWN_WEIGHTS`.

    Args:
        entry: the weights file to add.
        replace: allow replacing an entry of the same name.

    Returns:
        The entry, for chaining.

    Raises:
        ValueError: an entry of that name exists and ``replace`` is False, or the hash is
            not of the form ``"<algorithm>:<hex digest>"``.
    """
    if entry.name in KNOWN_WEIGHTS and not replace:
        raise ValueError(f"Weights {entry.name!r} are already registered ({KNOWN_WEIGHTS[entry.name].url}).")
    algorithm, _, digest = entry.known_hash.partition(":")
    if not algorithm or not digest:
        raise ValueError(f"known_hash must look like 'xxh128:<hex digest>', got {entry.known_hash!r}.")
    KNOWN_WEIGHTS[entry.name] = entry
    return entry


# Hashes as published in the issue that introduced this registry (xxh128 of the official files).
register_weights(
    KnownWeights(
        "vit_h", "vit_h", "sam_vit_h_4b8939.pth", _OFFICIAL + "sam_vit_h_4b8939.pth",
        "xxh128:97698fac30bd929c2e6d8d8cc15933c2", "SAM ViT-H, official (2.4 GB)",
    )
)
register_weights(
    KnownWeights(
        "vit_l", "vit_l", "sam_vit_l_0b3195.pth", _OFFICIAL + "sam_vit_l_0b3195.pth",
        "xxh128:a82beb3c660661e3dd38d999cc860e9a", "SAM ViT-L, official (1.2 GB)",
    )
)
register_weights(
    KnownWeights(
        "vit_b", "vit_b", "sam_vit_b_01ec64.pth", _OFFICIAL + "sam_vit_b_01ec64.pth",
        "xxh128:6923c33df3637b6a922d7682bfc9a86b", "SAM ViT-B, official (358 MB)",
    )
)


# The project's own small model, trained from scratch on synthetic microscopy-like images
# (scripts/train_small_model.py); shipped in the package, so it works offline.
SMALL_MODEL_HASH = "xxh128:984871f71ac299c1d5d132109a17bd49"
register_weights(
    KnownWeights(
        "vit_small", "vit_small", SMALL_MODEL_FILE.name, "", SMALL_MODEL_HASH,
        "napari-sam small model, bundled (16 MB, trained on synthetic microscopy images)",
        bundled=SMALL_MODEL_FILE,
    )
)

# Automatic-mask settings for the bundled model. Its predicted IoUs and stability scores
# run lower than the official models', so the reference's defaults (0.88, 0.95) keep no
# mask at all. Chosen over a grid of predicted-IoU, stability and box-NMS thresholds on
# held-out synthetic images that the evaluation does not use
# (`python benchmarks/eval_small_model.py --sweep-amg 10`): the best F1 of recall and
# one-to-one precision (duplicate masks of an object count as false positives) ...
SMALL_MODEL_AMG_THRESHOLDS = {"pred_iou_thresh": 0.55, "stability_score_thresh": 0.8, "box_nms_thresh": 0.3}
# ... and the most precise setting that still finds 80 % of the objects there: more
# objects, more false masks.
SMALL_MODEL_AMG_HIGH_RECALL = {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.5, "box_nms_thresh": 0.5}


def recommended_amg_thresholds(model_type: str) -> dict[str, float]:
    """Thresholds to use instead of the reference's defaults for a model type.

    Returns:
        ``{"pred_iou_thresh": ..., "stability_score_thresh": ..., "box_nms_thresh": ...}`` for ``"vit_small"``
        (:data:`SMALL_MODEL_AMG_THRESHOLDS`); an empty dict, i.e. the reference's defaults,
        for the official model types.
    """
    return dict(SMALL_MODEL_AMG_THRESHOLDS) if model_type == "vit_small" else {}


# Types tried, in order, by default_model_type: the first whose weights are cached wins.
DEFAULT_MODEL_PREFERENCE = ("vit_b", "vit_l", "vit_h")


def default_model_type(cache_dir: Optional[PathLike] = None) -> str:
    """The model used when none is given: the first of vit_b, vit_l, vit_h whose official
    weights are already in the cache folder, else the bundled ``vit_small`` (no download).
    """
    folder = get_cache_dir(cache_dir)
    for name in DEFAULT_MODEL_PREFERENCE:
        if (folder / KNOWN_WEIGHTS[name].filename).is_file():
            return name
    return "vit_small"


def known_weights(name_or_type: str) -> KnownWeights:
    """Look up weights by registry name or, failing that, by model type.

    ``"default"`` means ``"vit_h"``, as in the reference's ``sam_model_registry``.

    Raises:
        KeyError: no known weights of that name or type (the message lists them).
    """
    key = "vit_h" if name_or_type == "default" else name_or_type
    if key in KNOWN_WEIGHTS:
        return KNOWN_WEIGHTS[key]
    for entry in KNOWN_WEIGHTS.values():
        if entry.model_type == key:
            return entry
    raise KeyError(
        f"No known weights for {name_or_type!r}; known: {', '.join(KNOWN_WEIGHTS)}. Pass a checkpoint "
        f"path, or use sam_model_registry[{name_or_type!r}]() for an untrained model."
    )


def get_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The folder that holds downloaded (and hand-copied) weights files.

    Args:
        cache_dir: explicit folder; wins over everything else.

    Returns:
        ``cache_dir`` if given, else ``$NAPARI_SAM_CACHE_DIR`` if set and non-empty, else the
        platform's user cache folder for napari-sam. The folder is not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    import platformdirs

    return platformdirs.user_cache_path(APP_NAME, appauthor=False)


def download_url(entry: KnownWeights, mirror: Optional[str] = None) -> str:
    """The URL a weights file is fetched from: ``<mirror>/<filename>`` or the official URL.

    Args:
        entry: the weights.
        mirror: base URL; defaults to ``$NAPARI_SAM_MIRROR`` when set and non-empty.
    """
    base = mirror if mirror is not None else os.environ.get(MIRROR_ENV, "").strip()
    if base:
        return base.rstrip("/") + "/" + entry.filename
    return entry.url


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + VERIFIED_SUFFIX)


def _stat_record(path: Path, known_hash: str) -> dict:
    stat = path.stat()
    return {"hash": known_hash, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_marked_verified(path: Path, known_hash: str) -> bool:
    try:
        recorded = json.loads(_marker_path(path).read_text())
        return recorded == _stat_record(path, known_hash)
    except (OSError, ValueError):
        return False


def _mark_verified(path: Path, known_hash: str) -> None:
    try:
        _marker_path(path).write_text(json.dumps(_stat_record(path, known_hash)))
    except OSError as error:  # read-only cache: correct, just slower next time
        _logger.debug("Could not write %s (%s); the file will be hashed again next time.", _marker_path(path), error)


def _verify_local_file(path: Path, entry: KnownWeights) -> None:
    """Hash a file found in the cache without a valid sidecar; mark it when it matches."""
    import pooch

    algorithm, _, expected = entry.known_hash.partition(":")
    _logger.info("Checking the %s hash of %s (once).", algorithm, path)
    actual = pooch.file_hash(str(path), alg=algorithm)
    if actual.lower() != expected.lower():
        raise HashMismatchError(
            f"{path} does not match the known {algorithm} hash of {entry.name} weights (expected {expected}, "
            f"found {actual}). Delete or replace it; it is the file napari-sam would load for {entry.name}."
        )
    _mark_verified(path, entry.known_hash)


class _ProgressRelay:
    """Stands in for the tqdm bar that pooch's HTTPDownloader drives.

    pooch sets ``total`` (the Content-Length, 0 when unknown), calls ``update`` once per
    chunk with the chunk size, and at the end ``reset`` then ``update(total)``. This relay
    reports a count that never decreases and never exceeds a known total, to a terminal
    bar and/or a callback.
    """

    def __init__(self, description: str, bar: bool, callback: Optional[ProgressCallback]) -> None:
        self.total = 0
        self._description = description
        self._want_bar = bar
        self._bar = None
        self._callback = callback
        self._count = 0
        self._reported = -1

    def update(self, n: int) -> None:
        self._count += int(n)
        done = min(self._count, self.total) if self.total else self._count
        if done <= self._reported:
            return
        if self._want_bar:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=self.total or None, desc=self._description, unit="B", unit_scale=True,
                    unit_divisor=1024, leave=True,
                )
            self._bar.update(done - max(self._reported, 0))
        self._reported = done
        if self._callback is not None:
            self._callback(done, self.total)

    def reset(self) -> None:
        self._count = 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def fetch_weights(
    name: str,
    *,
    cache_dir: Optional[PathLike] = None,
    mirror: Optional[str] = None,
    progressbar: bool = True,
    progress_callback: Optional[ProgressCallback] = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Path of a known weights file in the cache folder, downloaded first when missing.

    A file already in the folder is used without any network request: its hash is
    checked once and remembered in a ``.verified`` sidecar (see the module docstring).

    Args:
        name: a :data:`KNOWN_WEIGHTS` name or model type (``"vit_b"``; ``"default"`` is vit_h).
        cache_dir: folder to use instead of :func:`get_cache_dir`'s default.
        mirror: base URL to fetch ``<mirror>/<filename>`` from; default ``$NAPARI_SAM_MIRROR``.
        progressbar: show a terminal progress bar (tqdm, on stderr) while downloading.
        progress_callback: called as ``callback(downloaded_bytes, total_bytes)`` after each
            received chunk (about 1 MiB) with a non-decreasing byte count; ``total_bytes``
            is the server's Content-Length, 0 when it sends none. Raising in the callback
            cancels the download and leaves nothing in the cache.
        timeout: seconds to wait for the server to connect or send data.

    Returns:
        Absolute path of the verified file.

    Raises:
        KeyError: unknown weights name.
        HashMismatchError: the download (deleted) or a file already in the folder (kept,
            the message says which) does not have the known hash.
        DownloadError: offline, server down, HTTP error, or transfer cut off; the message
            names the URL, the file name and the folder where a hand-downloaded copy is
            picked up.
    """
    entry = known_weights(name)
    if entry.bundled is not None:
        if not entry.bundled.is_file():
            raise DownloadError(
                f"The bundled {entry.name} weights are missing from the package ({entry.bundled}). In a source "
                f"checkout, create them with 'python scripts/train_small_model.py', or reinstall napari-sam."
            )
        return entry.bundled
    folder = get_cache_dir(cache_dir).resolve()
    path = folder / entry.filename
    if path.is_file():
        if not _is_marked_verified(path, entry.known_hash):
            _verify_local_file(path, entry)
        return path

    import pooch
    import requests

    url = download_url(entry, mirror)
    relay = _ProgressRelay(entry.filename, progressbar, progress_callback)
    use_relay = progressbar or progress_callback is not None
    downloader = pooch.HTTPDownloader(
        progressbar=relay if use_relay else False, chunk_size=_CHUNK_BYTES, timeout=timeout
    )
    _logger.info("Downloading %s weights from %s to %s", entry.name, url, folder)
    try:
        pooch.retrieve(url, known_hash=entry.known_hash, fname=entry.filename, path=folder, downloader=downloader)
    except ValueError as error:  # pooch's hash check; the temporary file is already deleted
        raise HashMismatchError(
            f"The file downloaded from {url} does not match the known hash of {entry.name} weights "
            f"({entry.known_hash}) and was deleted. {error}"
            + (" Check that the mirror serves the official file." if url != entry.url else "")
        ) from error
    except requests.exceptions.RequestException as error:
        raise DownloadError(
            f"Could not download {entry.filename} from {url}: {error}\n"
            f"Without network access, download {entry.filename} elsewhere (from {entry.url}) and copy it "
            f"into {folder} (exact folder; napari-sam picks it up from there and checks its hash once). "
            f"Or set {MIRROR_ENV} to a base URL that serves {entry.filename}, or {CACHE_DIR_ENV} to "
            f"another folder."
        ) from error
    finally:
        relay.close()
    _mark_verified(path, entry.known_hash)
    return path


def resolve_checkpoint(
    model_type: str = "vit_b",
    checkpoint: Optional[PathLike] = None,
    *,
    cache_dir: Optional[PathLike] = None,
    mirror: Optional[str] = None,
    progressbar: bool = True,
    progress_callback: Optional[ProgressCallback] = None,
) -> Path:
    """The checkpoint file to load: ``checkpoint`` when given, else the known weights of ``model_type``.

    This is the single entry point for the CLI and the napari widget: ``--checkpoint``
    wins; without it the default weights of the chosen type come from the cache folder,
    downloaded (with progress) when missing.

    Args:
        model_type: model type or known weights name; ignored when ``checkpoint`` is given.
        checkpoint: path of a checkpoint file.
        cache_dir, mirror, progressbar, progress_callback: see :func:`fetch_weights`.

    Returns:
        Path of an existing file.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        KeyError, DownloadError, HashMismatchError: see :func:`fetch_weights`.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {str(path)!r} (expected a .pth file).")
        return path
    return fetch_weights(
        model_type, cache_dir=cache_dir, mirror=mirror, progressbar=progressbar, progress_callback=progress_callback
    )


def default_device() -> "torch.device":
    """``cuda`` when a CUDA GPU is available, else ``cpu``."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_like_path(value: str) -> bool:
    """True for a checkpoint path passed where a model type was expected (reference style)."""
    from .build import MODEL_CONFIGS

    if value == "default" or value in MODEL_CONFIGS or value in KNOWN_WEIGHTS:
        return False
    return value.endswith((".pth", ".pt")) or os.sep in value or os.path.isfile(value)


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
    downloading them when missing (the bundled ``vit_small`` is never downloaded). With ``checkpoint``, the model
    type is detected from the tensor shapes, so ``build_sam(checkpoint=path)`` (the
    reference's call style) is enough; a ``model_type`` that disagrees with the file is
    logged as a warning and the detected type is built. A bare state dict, or one under a
    ``"model"`` or ``"state_dict"`` key, loads. For compatibility with the reference's
    ``build_sam(path)``, a first argument that is a file path is taken as ``checkpoint``.

    Args:
        model_type: ``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"vit_small"``, ``"default"``
            (= vit_h) or another known weights name; None means :func:`default_model_type`
            (cached official weights, else the bundled small model) without a checkpoint
            and "detect" with one.
        checkpoint: path of a PyTorch checkpoint holding a SAM state dict.
        device: where to put the model; None means cuda when available, else cpu.
        cache_dir, mirror, progressbar, progress_callback: see :func:`fetch_weights`.

    Returns:
        The model (``napari_sam.modeling.Sam``), in eval mode.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        CheckpointError: the file is not a SAM checkpoint of a known type.
        KeyError: no known weights for ``model_type``.
        DownloadError, HashMismatchError: see :func:`fetch_weights`.
    """
    from .build import MODEL_CONFIGS, build_sam_from_config, detect_model_type, load_state_dict_strict, read_state_dict

    if checkpoint is None and model_type is not None and _looks_like_path(model_type):
        model_type, checkpoint = None, model_type
    path = resolve_checkpoint(
        model_type or default_model_type(cache_dir), checkpoint, cache_dir=cache_dir, mirror=mirror, progressbar=progressbar,
        progress_callback=progress_callback,
    )
    state = read_state_dict(path)
    detected = detect_model_type(state)
    if checkpoint is not None and model_type is not None:
        requested = "vit_h" if model_type == "default" else model_type
        if requested != detected:
            _logger.warning(
                "%s holds a %s model, not %s as requested; building %s.", path, detected, model_type, detected
            )
    model = build_sam_from_config(MODEL_CONFIGS[detected])
    load_state_dict_strict(model, state, detected)
    return model.to(device if device is not None else default_device()).eval()


__all__ = [
    "CACHE_DIR_ENV",
    "DownloadError",
    "HashMismatchError",
    "KNOWN_WEIGHTS",
    "KnownWeights",
    "MIRROR_ENV",
    "build_sam",
    "default_device",
    "default_model_type",
    "download_url",
    "fetch_weights",
    "get_cache_dir",
    "known_weights",
    "register_weights",
    "resolve_checkpoint",
]
