"""Atomic file writes: readers see the old file (or folder) or the complete new one, never half of it.

Temporary siblings are named ``.<name>.napari-sam-<pid>-<12 hex>.tmp`` (:data:`TEMP_PATTERN`),
so a run that was killed (SIGKILL, power loss) leaves recognisable leftovers that
:func:`remove_stale_temporaries` deletes on the next run; nothing else is ever touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

# Our temporary siblings: ".<name>.napari-sam-<pid>-<12 hex>.tmp".
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.napari-sam-(?P<pid>\d+)-[0-9a-f]{12}\.tmp$")
# The naming of earlier versions (".<name>.<12 hex>.tmp", no process id): removed once older than
# LEGACY_TEMP_AGE_S, since whether its writer still runs cannot be known.
LEGACY_TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")
LEGACY_TEMP_AGE_S = 3600.0


def temporary_sibling(path: PathLike) -> Path:
    """A fresh temporary name beside ``path`` that matches :data:`TEMP_PATTERN` (nothing is created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.napari-sam-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_write(path: PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Write through a temporary sibling of ``path`` that is renamed into place on success.

    Use as ``with atomic_write(out) as temp: save(temp)``. The temporary file (not created:
    write it yourself) or folder (created, empty) lies in the same folder as ``path``, so the
    final rename is atomic on one file system. It is created like a plain write, so the result
    follows the umask (files ``0o666 & ~umask``, folders ``0o777 & ~umask``; not mkstemp's
    0600 / mkdtemp's 0700). On any error it is removed and the error propagates; ``path`` is
    untouched. A process killed mid-write leaves the temporary sibling behind: see
    :func:`remove_stale_temporaries`.

    Args:
        path: the final file or folder; an existing file is replaced, an existing folder is
            removed just before the rename (the caller decides whether that is allowed).
        directory: write a folder instead of a file.

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    temp = temporary_sibling(path)
    if directory:
        temp.mkdir()  # mode 0o777 & ~umask, as a plain mkdir
    try:
        yield temp
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(temp, path)
    except BaseException:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else (or cannot tell)
        return True
    return True


def is_stale_temporary(path: PathLike, *, now: float | None = None) -> bool:
    """Whether ``path`` is a leftover of an :func:`atomic_write` whose process is gone.

    True for a name matching :data:`TEMP_PATTERN` whose process id no longer runs on this
    machine, and for the older naming (:data:`LEGACY_TEMP_PATTERN`) once it is older than
    :data:`LEGACY_TEMP_AGE_S`. Any other name is never stale.
    """
    path = Path(path)
    match = TEMP_PATTERN.match(path.name)
    if match:
        return not _process_alive(int(match["pid"]))
    if LEGACY_TEMP_PATTERN.match(path.name):
        try:
            age = (time.time() if now is None else now) - path.lstat().st_mtime
        except OSError:
            return False
        return age > LEGACY_TEMP_AGE_S
    return False


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete the leftovers of killed :func:`atomic_write` calls directly inside ``folder``.

    Only entries that :func:`is_stale_temporary` recognises are removed (files, or folders
    with their contents); symbolic links are never followed. Entries that cannot be removed
    are left alone.

    Args:
        folder: the folder to clean (missing: nothing to do).

    Returns:
        The removed paths.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or not entry.name.endswith(".tmp"):
            continue
        path = Path(entry.path)
        if not is_stale_temporary(path):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def write_json_atomically(path: PathLike, payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as temp, open(temp, "w") as file:
        json.dump(payload, file)
    return Path(path)
