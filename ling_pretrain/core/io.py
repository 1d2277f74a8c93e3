"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False
) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it.

    Parent directories are created. The temporary name carries the process id, so processes
    writing the same path do not trample each other's temporary file; it is removed if
    ``write`` fails.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text``."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def default_file_mode() -> int:
    """The mode a new file gets from this process's umask (``0o644`` under the usual 022);
    for files written by libraries that create them ``0o600``."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
