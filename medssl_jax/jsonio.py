"""The one JSON writer of the codebase: atomic, so a reader (or a resumed run) never sees half a file.

The payload goes to PATH.tmp<pid> first and is renamed over PATH; the pid keeps processes of a
multi-process job that write the same file from sharing a temporary name.
"""

from __future__ import annotations

import json
import os


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = False,
               default=None, allow_nan: bool = False) -> None:
    """Writes `obj` as JSON to `path` atomically; strict JSON (NaN or infinity is an error) unless
    `allow_nan` (files only this codebase reads back, e.g. a cached monitor score that may be NaN)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan)
        f.write("\n")
    os.replace(tmp, path)
