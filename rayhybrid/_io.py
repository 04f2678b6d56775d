"""Small files written so that a reader never sees half of one: the run folder's bookkeeping,
checkpoint completion markers, comparison records, trial results.

The standard library has no atomic write; this is the usual pattern (write a temporary file
beside the target, flush it to disk, rename it over the target: ``os.replace`` is atomic on
POSIX file systems, NFS included), in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic", "write_text_atomic"]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one.

    Raises:
        OSError: the folder is not writable (the target is left as it was).
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename makes it the file
    os.replace(tmp, target)


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> None:
    """:func:`write_text_atomic` of ``json.dumps(obj, **dumps)`` (``indent=1`` by default)."""
    write_text_atomic(path, json.dumps(obj, **{"indent": 1, **dumps}))
