"""Atomic file writes: readers see the old file (or folder) or the complete new one, never half of it."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_write(path: PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Write through a temporary sibling of ``path`` that is renamed into place on success.

    Use as ``with atomic_write(out) as temp: save(temp)``. The temporary file (not created:
    write it yourself) or folder (created, empty) lies in the same folder as ``path``, so the
    final rename is atomic on one file system; the result has the permissions a plain write
    would give it. On any error it is removed and the error
    propagates; ``path`` is untouched.

    Args:
        path: the final file or folder; an existing file is replaced, an existing folder is
            removed just before the rename (the caller decides whether that is allowed).
        directory: write a folder instead of a file.

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    # A unique sibling name, created with the usual permissions (mkstemp's would be 0600).
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    if directory:
        temp.mkdir()
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


def write_json_atomically(path: PathLike, payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as temp, open(temp, "w") as file:
        json.dump(payload, file)
    return Path(path)
