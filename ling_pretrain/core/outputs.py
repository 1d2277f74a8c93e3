"""Directories and files a command writes: it never deletes or overwrites what it did not
write.

Every output directory a command creates gets a small manifest (:data:`MANIFEST`) naming the
kind of output and the files it wrote. A later run of a command:

* writes into a new or empty directory freely;
* refuses a non-empty directory without a manifest of its kind, naming what is there;
* refuses a previous output of its kind unless asked to replace it (``--overwrite``), and then
  replaces only the files that previous output wrote: everything else in the directory is
  kept.

The new output is written beside the directory (``<dir>.partial``), the files to keep are
linked into it, and it is swapped in with two renames, so a reader sees the old output or the
new one, and a crash leaves the old one in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_json

MANIFEST = ".ling_pretrain_output.json"
"""The manifest of an output directory: ``{"kind": ..., "files": [...]}``."""


def _names(path: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of an output directory, or None."""
    file = Path(path) / MANIFEST
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


@dataclass(frozen=True)
class OutputDir:
    """A directory a command may write an output of ``kind`` into (see :func:`claim_dir`)."""

    path: Path
    kind: str
    previous: tuple[str, ...] = field(default=())
    """Files (top-level names) the previous output of this kind wrote; replaced."""

    @property
    def staging(self) -> Path:
        """Where the new output is written before :func:`publish` swaps it in."""
        return self.path.with_name(self.path.name + ".partial")


def claim_dir(
    path: str | os.PathLike, kind: str, *, overwrite: bool = False, option: str = "--overwrite"
) -> OutputDir:
    """Check, before any work, that an output of ``kind`` may be written to ``path``.

    Reads only. Raises:
        ConfigError: ``path`` is a file; holds files no output of ``kind`` wrote; or holds a
            previous output of ``kind`` and ``overwrite`` is False (the message names
            ``option``).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p} is a file, not a directory; choose a directory for the {kind}.")
    if not p.exists() or not any(p.iterdir()):
        return OutputDir(p, kind)
    manifest = read_manifest(p)
    if manifest is None or manifest.get("kind") != kind:
        raise ConfigError(
            f"{p} is not empty and is not a previous {kind} of this project (it holds "
            f"{_names(p)}); nothing was written. Choose a new or empty directory: this "
            "command never deletes files it did not write."
        )
    if not overwrite:
        raise ConfigError(
            f"{p} holds a previous {kind} ({len(manifest['files'])} files). Pass {option} to "
            "replace the files that output wrote (other files in the directory are kept), or "
            "choose another directory."
        )
    return OutputDir(p, kind, tuple(str(f) for f in manifest["files"]))


def prepare_staging(out: OutputDir) -> Path:
    """An empty staging directory beside the output (a stale one from a crash is removed:
    it only ever holds files of ours and links)."""
    staging = out.staging
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def publish(out: OutputDir) -> Path:
    """Swap the staging directory in as ``out.path``, keeping the files the previous output
    did not write. The staging directory must hold the whole new output.

    Raises:
        ConfigError: a kept file has the name of a new output file (nothing is changed).
    """
    staging = out.staging
    written = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST)
    atomic_write_json(staging / MANIFEST, {"kind": out.kind, "files": written})
    if out.path.exists():
        keep = [p for p in out.path.iterdir() if p.name not in out.previous and p.name != MANIFEST]
        clash = sorted(p.name for p in keep if (staging / p.name).exists())
        if clash:
            shutil.rmtree(staging)
            raise ConfigError(
                f"{out.path} holds {', '.join(clash)}, which the previous {out.kind} did not "
                f"write but the new one would; move them away and run again (nothing changed)."
            )
        for p in keep:
            _link_or_copy(p, staging / p.name)
        old = out.path.with_name(out.path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out.path, old)
        os.replace(staging, out.path)
        shutil.rmtree(old)
    else:
        out.path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out.path)
    return out.path


def start_in_place(out: OutputDir, files: list[str]) -> Path:
    """For outputs written directly into ``out.path`` over a long time (whole training runs):
    remove the files the previous output wrote, record ``files`` as this output's, and return
    the directory. Nothing else in it is touched."""
    out.path.mkdir(parents=True, exist_ok=True)
    for name in out.previous:
        target = out.path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    atomic_write_json(out.path / MANIFEST, {"kind": out.kind, "files": sorted(files)})
    return out.path


def claim_file(
    path: str | os.PathLike,
    what: str,
    is_ours: Callable[[Path], bool],
) -> Path:
    """Check, before any work, that ``path`` may be (over)written: it does not exist, or it is
    a previous output of ours (``is_ours``).

    Raises:
        ConfigError: ``path`` is a directory or a file this project did not write.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; give a file name.")
    if p.exists() and not is_ours(p):
        raise ConfigError(
            f"{what} {p} exists and was not written by this command; it is not overwritten. "
            "Give another file name or move it away."
        )
    return p
