"""File helpers shared by the command line tool and the COCO export."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union


def write_json_atomically(path: Union[str, "os.PathLike[str]"], payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` through a temporary sibling and a rename.

    Readers see the old file or the complete new one, never a half-written file; on any
    error the temporary file is removed and the error propagates.
    """
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(payload, file)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
