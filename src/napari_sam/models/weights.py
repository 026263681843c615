"""Weights files: cache folder, verified downloads with progress, mirrors.

This module knows files, not models: which weights exist for which model type is declared
in the model registry (:mod:`napari_sam.models.zoo`), which fills :data:`KNOWN_WEIGHTS`.

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
    connection, a progress callback that raises or :func:`cancel_downloads` leaves nothing
    behind. Progress goes to a terminal bar (tqdm) and/or to a callback
    ``(downloaded_bytes, total_bytes)``, and to every listener added with
    :func:`on_download` (the napari model picker shows napari progress and a Cancel button).

Mirrors:
    ``NAPARI_SAM_MIRROR`` (or the ``mirror`` argument) is a base URL; the file is fetched
    from ``<mirror>/<file name>`` instead of its official URL, with the same hash check.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

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


class DownloadCancelled(DownloadError):
    """A download was cancelled (:func:`cancel_downloads`); nothing was left in the cache folder."""


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
        size_mb: download size in MB (10**6 bytes), approximate where the publisher does not
            state it; None: unknown.
        layout: how the file stores the SAM tensors, one of
            :data:`napari_sam.models.state_dict.LAYOUTS` ("state_dict" or "torch_em"); the
            reader accepts either, this says what the publisher's file is expected to hold.
    """

    name: str
    model_type: str
    filename: str
    url: str
    known_hash: str
    description: str = ""
    bundled: Optional[Path] = None
    size_mb: Optional[float] = None
    layout: str = "state_dict"

    @property
    def size_text(self) -> str:
        """``"358 MB"``, ``"1.2 GB"``, or ``""`` when the size is unknown."""
        if self.size_mb is None:
            return ""
        return f"{self.size_mb / 1000:.1f} GB" if self.size_mb >= 1000 else f"{self.size_mb:.0f} MB"


#: Known weights by name, filled by the model registry (:mod:`napari_sam.models.zoo`)
#: through :func:`register_weights`; the first entry of a model type is that type's default.
KNOWN_WEIGHTS: dict[str, KnownWeights] = {}
#: Other names of weights entries (the reference's ``"default"``), filled by the registry.
WEIGHTS_ALIASES: dict[str, str] = {}


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



def known_weights(name_or_type: str) -> KnownWeights:
    """Look up weights by registry name or, failing that, by model type.

    Aliases (:data:`WEIGHTS_ALIASES`, e.g. the reference's ``"default"``) are resolved first.

    Raises:
        KeyError: no known weights of that name or type (the message lists them).
    """
    key = WEIGHTS_ALIASES.get(name_or_type, name_or_type)
    if key in KNOWN_WEIGHTS:
        return KNOWN_WEIGHTS[key]
    for entry in KNOWN_WEIGHTS.values():
        if entry.model_type == key:
            return entry
    raise KeyError(
        f"No known weights for {name_or_type!r}; known: {', '.join(KNOWN_WEIGHTS)}. Pass a checkpoint "
        f"path, or use sam_model_registry[{name_or_type!r}]() for an untrained model."
    )


def is_cached(name: str, cache_dir: Optional[PathLike] = None) -> bool:
    """Whether known weights load without a download: bundled in the package, or their file
    is in the cache folder (its hash is checked when it is used)."""
    entry = known_weights(name)
    if entry.bundled is not None:
        return entry.bundled.is_file()
    return (get_cache_dir(cache_dir) / entry.filename).is_file()


@dataclass(frozen=True)
class DownloadEvent:
    """What :func:`on_download` listeners receive.

    Attributes:
        name: the weights' name (e.g. ``"vit_b_lm"``).
        filename: the file being downloaded.
        done: bytes received so far.
        total: the server's Content-Length, 0 when unknown.
        state: ``"started"``, ``"progress"``, or how it ended: ``"finished"``, ``"cancelled"``,
            ``"failed"``.
    """

    name: str
    filename: str
    done: int
    total: int
    state: str

    @property
    def ended(self) -> bool:
        return self.state in ("finished", "cancelled", "failed")


_LISTENERS: list[Callable[[DownloadEvent], None]] = []
_LOCK = threading.Lock()
_ACTIVE: dict[int, int] = {}  # download id -> the cancel generation it started in
_download_ids = itertools.count()
_cancel_generation = 0


def on_download(callback: Callable[[DownloadEvent], None]) -> Callable[[], None]:
    """Call ``callback(event)`` for every download's start, progress and end, on the thread
    that downloads; returns a function that removes it. A listener's exception is logged and
    ignored."""
    _LISTENERS.append(callback)

    def disconnect() -> None:
        if callback in _LISTENERS:
            _LISTENERS.remove(callback)

    return disconnect


def _emit(event: DownloadEvent) -> None:
    for listener in list(_LISTENERS):
        try:
            listener(event)
        except Exception:  # a display problem must not break (or cancel) the download
            _logger.warning("A download listener failed on %s", event, exc_info=True)


def cancel_downloads() -> int:
    """Cancel every download running now, at its next chunk (about 1 MiB): it raises
    :class:`DownloadCancelled` and leaves nothing in the cache folder. Later downloads run.

    Returns:
        How many downloads were running.
    """
    global _cancel_generation
    with _LOCK:
        _cancel_generation += 1
        return len(_ACTIVE)


def downloads_running() -> int:
    """How many downloads are running now (in any thread)."""
    with _LOCK:
        return len(_ACTIVE)


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

    def __init__(
        self, description: str, bar: bool, callback: Optional[ProgressCallback],
        cancelled: Callable[[], bool] = lambda: False, event: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.total = 0
        self._cancelled = cancelled
        self._event = event
        self._description = description
        self._want_bar = bar
        self._bar = None
        self._callback = callback
        self._count = 0
        self._reported = -1

    def update(self, n: int) -> None:
        if self._cancelled():
            raise DownloadCancelled(f"The download of {self._description} was cancelled; nothing was kept.")
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
        if self._event is not None:
            self._event(done, self.total)

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
        name: a :data:`KNOWN_WEIGHTS` name or model type (e.g. ``"vit_b"``) or alias.
        cache_dir: folder to use instead of :func:`get_cache_dir`'s default.
        mirror: base URL to fetch ``<mirror>/<filename>`` from; default ``$NAPARI_SAM_MIRROR``.
        progressbar: show a terminal progress bar (tqdm, on stderr) while downloading.
        progress_callback: called as ``callback(downloaded_bytes, total_bytes)`` after each
            received chunk (about 1 MiB) with a non-decreasing byte count; ``total_bytes``
            is the server's Content-Length, 0 when it sends none. Raising in the callback
            cancels the download and leaves nothing in the cache; so does
            :func:`cancel_downloads` (from any thread).
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
        DownloadCancelled: :func:`cancel_downloads` was called during the download.
    """
    entry = known_weights(name)
    if entry.bundled is not None:
        if not entry.bundled.is_file():
            raise DownloadError(
                f"The bundled {entry.name} weights are missing from the package ({entry.bundled}). In a source "
                f"checkout, create them with 'python experiments/train_small_model.py', or reinstall napari-sam."
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
    with _LOCK:
        download_id = next(_download_ids)
        _ACTIVE[download_id] = generation = _cancel_generation

    def event(done: int, total: int, state: str = "progress") -> None:
        _emit(DownloadEvent(entry.name, entry.filename, done, total, state))

    relay = _ProgressRelay(
        entry.filename, progressbar, progress_callback, lambda: _cancel_generation != generation, event
    )
    # The relay always drives pooch (without a bar or callback it only checks for cancellation).
    downloader = pooch.HTTPDownloader(progressbar=relay, chunk_size=_CHUNK_BYTES, timeout=timeout)
    _logger.info("Downloading %s weights from %s to %s", entry.name, url, folder)
    state = "failed"
    event(0, 0, "started")
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
    except DownloadCancelled:
        state = "cancelled"
        raise
    else:
        state = "finished"
    finally:
        relay.close()
        with _LOCK:
            _ACTIVE.pop(download_id, None)
        event(relay._count, relay.total, state)
    _mark_verified(path, entry.known_hash)
    return path


def resolve_checkpoint(
    model_type: Optional[str] = None,
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
    if model_type is None:
        raise ValueError("resolve_checkpoint needs a model type or a checkpoint path.")
    return fetch_weights(
        model_type, cache_dir=cache_dir, mirror=mirror, progressbar=progressbar, progress_callback=progress_callback
    )


__all__ = [
    "CACHE_DIR_ENV",
    "DownloadCancelled",
    "DownloadError",
    "DownloadEvent",
    "HashMismatchError",
    "KNOWN_WEIGHTS",
    "KnownWeights",
    "MIRROR_ENV",
    "WEIGHTS_ALIASES",
    "cancel_downloads",
    "download_url",
    "downloads_running",
    "fetch_weights",
    "get_cache_dir",
    "is_cached",
    "known_weights",
    "on_download",
    "register_weights",
    "resolve_checkpoint",
]
