"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one.

Every writer in the project goes through :func:`atomic_open`: the data is written to a
temporary file next to the destination, flushed and fsynced, and only then renamed over it.
A writer that fails, or a process that is killed, leaves at most a temporary file whose name
ends in ``.tmp<pid>``; the destination is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary name :func:`atomic_open` writes ``path`` under: ``<name>.tmp<pid>``.

    The process id keeps processes that write the same path from trampling each other's
    temporary file.
    """
    out = Path(path)
    return out.with_name(f"{out.name}.tmp{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside directory ``path`` durable (best effort: some file systems
    cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file being written under a temporary name; :meth:`commit` publishes it.

    Used as a context manager it commits when the block succeeds and discards the temporary
    file when it raises. A streaming writer may instead keep it open across calls and commit
    or discard it explicitly, also under another destination name than the one it was
    opened for.

    Attributes:
        path: The destination.
        tmp: The temporary file being written.
        file: The open temporary file.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w", *, sync_dir: bool = False):
        if mode not in ("w", "wb"):
            raise ValueError(
                f"atomic_open writes a whole new file: mode must be 'w' or 'wb', not {mode!r}"
            )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self.sync_dir = sync_dir
        self.file: IO = open(self.tmp, mode, encoding=None if mode == "wb" else "utf-8")

    def commit(self, path: str | os.PathLike | None = None) -> Path:
        """Flush and fsync the file, then rename it to ``path`` (default: the path it was
        opened for); with ``sync_dir`` also fsync the directory, so the rename is durable.

        On failure the temporary file is removed and the destination is left as it was.
        """
        out = Path(path) if path is not None else self.path
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, out)
        except BaseException:
            self.discard()
            raise
        if self.sync_dir:
            fsync_dir(out.parent)
        return out

    def discard(self) -> None:
        """Close and remove the temporary file; the destination is not touched."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_open(path: str | os.PathLike, mode: str = "w", *, sync_dir: bool = False) -> AtomicFile:
    """Open ``path`` for an atomic write: ``with atomic_open(p, "wb") as f: f.write(data)``.

    Parent directories are created. Text modes write UTF-8.

    Args:
        path: The destination; it is only replaced when the write succeeds.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        sync_dir: Also fsync the directory after the rename, so that the new file survives
            a power loss, not only a crash of the process.

    Returns:
        An :class:`AtomicFile`: a context manager yielding the open file, or, for writes
        that span several calls, an object to write through ``.file`` and then commit.
    """
    return AtomicFile(path, mode, sync_dir=sync_dir)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO], None],
    binary: bool = False,
    *,
    sync_dir: bool = False,
) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it.

    Parent directories are created; the temporary file is removed if ``write`` fails. See
    :func:`atomic_open` for ``sync_dir``.
    """
    handle = atomic_open(path, "wb" if binary else "w", sync_dir=sync_dir)
    with handle as f:
        write(f)
    return handle.path


def atomic_write_text(path: str | os.PathLike, text: str, *, sync_dir: bool = False) -> Path:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text), sync_dir=sync_dir)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def default_file_mode() -> int:
    """The mode a new file gets from this process's umask (``0o644`` under the usual 022);
    for files written by libraries that create them ``0o600``."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
