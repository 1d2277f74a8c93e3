"""Finding the input files, classifying them, and cutting them into units of work.

A unit is a contiguous piece of one file (a byte range of a plain JSONL file, a row group of
a Parquet file, or a whole file otherwise): the unit of splitting a run into job-array parts
and of resuming. :class:`Locator` turns a record's position back into ``file:line``.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ling_pretrain.data.pretokenize.options import DEFAULT_TEXT_SUFFIXES, PretokenizeError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
HF_DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")

MAX_UNIT_BYTES = 2**30
"""Plain JSONL files are read in pieces of at most this many bytes (the resume granularity)."""
MIN_SPLIT_BYTES = 16 * 2**20
"""With ``num_shards > 1`` pieces are made smaller, but not below this, to balance tasks."""


@dataclass(frozen=True)
class InputFile:
    """One input file, classified."""

    path: str
    kind: str
    """``jsonl``, ``parquet``, ``arrow`` or ``text``."""
    compression: str | None
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Unit:
    """A contiguous piece of one input file: the unit of task splitting and of resuming."""

    file: int
    start: int = 0
    """Byte offset (plain JSONL) or row-group index (Parquet)."""
    end: int = 0
    """Byte end (plain JSONL) or row-group end (Parquet); unused otherwise."""
    row_base: int = 0
    """Parquet rows before this unit, for error locations."""
    weight: int = 0
    """Approximate bytes, for balancing ``num_shards``."""


def _classify(path: str, text_suffixes: Sequence[str], explicit: bool) -> tuple[str, str | None]:
    name = os.path.basename(path).lower()
    root, ext = os.path.splitext(name)
    compression = COMPRESSION_SUFFIXES.get(ext)
    if compression is not None:
        if os.path.splitext(root)[1] in JSONL_SUFFIXES or explicit:
            return "jsonl", compression
        return "", None
    if ext in JSONL_SUFFIXES:
        return "jsonl", None
    if ext in PARQUET_SUFFIXES:
        return "parquet", None
    if ext in ARROW_SUFFIXES:
        return "arrow", None
    if explicit or ext in text_suffixes:
        return "text", None
    return "", None


def _hf_dataset_files(directory: str) -> list[str]:
    """Arrow files of a ``save_to_disk`` directory (a Dataset or a DatasetDict), in order."""
    dict_json = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(dict_json):
        with open(dict_json, encoding="utf-8") as f:
            splits = json.load(f).get("splits", [])
        files: list[str] = []
        for split in splits:
            files.extend(_hf_dataset_files(os.path.join(directory, split)))
        return files
    state_json = os.path.join(directory, "state.json")
    if os.path.isfile(state_json):
        with open(state_json, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
        return [os.path.join(directory, name) for name in names]
    return sorted(glob.glob(os.path.join(directory, "*.arrow")))


def _is_hf_dataset(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, m)) for m in HF_DATASET_MARKERS)


def discover_inputs(
    paths: Iterable[str], text_suffixes: Sequence[str] = DEFAULT_TEXT_SUFFIXES
) -> list[InputFile]:
    """Expand input paths into classified files, in a deterministic order.

    Paths keep the order given; directories are walked recursively in sorted order,
    skipping hidden entries and files of unknown type; a directory written by
    ``datasets.Dataset.save_to_disk`` is read as its Arrow files.

    Raises:
        PretokenizeError: for a missing path or when no input file is found.
    """
    found: list[tuple[str, str, str | None]] = []
    ignored: list[str] = []
    text_suffixes = tuple(s.lower() for s in text_suffixes)

    def walk(directory: str) -> None:
        if _is_hf_dataset(directory):
            found.extend((p, "arrow", None) for p in _hf_dataset_files(directory))
            return
        for name in sorted(os.listdir(directory)):
            if name.startswith("."):
                continue
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                walk(path)
                continue
            kind, compression = _classify(path, text_suffixes, explicit=False)
            if kind:
                found.append((path, kind, compression))
            else:
                ignored.append(path)

    for raw in paths:
        path = os.path.abspath(os.path.expanduser(raw))
        if not os.path.exists(path):
            raise PretokenizeError(
                f"input path not found: {raw!r}; check the path (wildcards must be expanded by "
                "the shell)"
            )
        if os.path.isdir(path):
            walk(path)
        else:
            kind, compression = _classify(path, text_suffixes, explicit=True)
            found.append((path, kind, compression))
    if ignored:
        logger.info("ignored %d files of unknown type (first: %s)", len(ignored), ignored[0])
    if not found:
        raise PretokenizeError(
            f"no input files found in {list(paths)!r}; expected JSONL (.jsonl, .json, .ndjson, "
            f"optionally .gz/.zst), Parquet, Arrow or text ({', '.join(text_suffixes)}) files"
        )
    files = []
    for path, kind, compression in found:
        if not os.path.isfile(path):
            raise PretokenizeError(f"input file not found: {path!r} (listed by its dataset dir)")
        stat = os.stat(path)
        files.append(InputFile(path, kind, compression, stat.st_size, stat.st_mtime_ns))
    return files


def unreadable(path: str, exc: BaseException) -> PretokenizeError:
    """The error for an input file that cannot be read or decoded."""
    return PretokenizeError(
        f"cannot read {path}: {str(exc).rstrip('.')}; the file is damaged (a truncated download or copy?) or "
        "not what its name says: repair, replace or remove it, then rerun"
    )


def choose_split_bytes(
    files: Sequence[InputFile], num_shards: int, requested: int | None = None
) -> int:
    """The size plain JSONL files are cut into: ``requested``, or chosen so that each of
    ``num_shards`` parts gets about four pieces (between ``MIN_SPLIT_BYTES`` and
    ``MAX_UNIT_BYTES``)."""
    if requested is not None:
        return requested
    if num_shards == 1:
        return MAX_UNIT_BYTES
    total = sum(f.size for f in files if f.kind == "jsonl" and f.compression is None)
    return min(MAX_UNIT_BYTES, max(MIN_SPLIT_BYTES, math.ceil(total / (4 * num_shards))))


def plan_units(files: Sequence[InputFile], split_bytes: int) -> list[Unit]:
    """Cut every file into units: plain JSONL into pieces of at most ``split_bytes`` (cut at
    line boundaries when read), Parquet into row groups, anything else whole."""
    units = []
    for index, f in enumerate(files):
        if f.kind == "jsonl" and f.compression is None and f.size > split_bytes:
            pieces = math.ceil(f.size / split_bytes)
            step = math.ceil(f.size / pieces)
            for start in range(0, f.size, step):
                end = min(start + step, f.size)
                units.append(Unit(index, start, end, weight=end - start))
        elif f.kind == "jsonl" and f.compression is None:
            units.append(Unit(index, 0, f.size, weight=f.size))
        elif f.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(f.path).metadata
            except (OSError, pa.ArrowException) as exc:
                raise unreadable(f.path, exc) from None
            total_rows = max(meta.num_rows, 1)
            row_base = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                weight = f.size * rows // total_rows
                units.append(Unit(index, group, group + 1, row_base, weight))
                row_base += rows
        else:
            units.append(Unit(index, weight=f.size))
    return units


def select_units(units: list[Unit], num_shards: int, shard_index: int) -> list[int]:
    """Indices of the units of part ``shard_index``: contiguous and balanced by size."""
    if num_shards == 1:
        return list(range(len(units)))
    total = sum(u.weight for u in units)
    selected = []
    before = 0
    for i, unit in enumerate(units):
        if total > 0:
            part = min(num_shards - 1, (num_shards * (2 * before + unit.weight)) // (2 * total))
        else:
            part = i * num_shards // len(units)
        if part == shard_index:
            selected.append(i)
        before += unit.weight
    return selected


class Locator:
    """Turns (unit, record) into ``file:line`` for messages."""

    def __init__(self, files: Sequence[InputFile], units: Sequence[Unit]) -> None:
        self.files = files
        self.units = units
        self._line_base: dict[int, int] = {}

    def __call__(self, unit_index: int, record: int, line_hint: int) -> str:
        unit = self.units[unit_index]
        f = self.files[unit.file]
        if f.kind == "text":
            return f"{f.path}:{line_hint}" if line_hint else f.path
        if f.kind == "parquet":
            return f"{f.path}:{unit.row_base + record + 1}"
        return f"{f.path}:{self._base(unit_index) + record + 1}"

    def _base(self, unit_index: int) -> int:
        unit = self.units[unit_index]
        f = self.files[unit.file]
        if f.kind != "jsonl" or f.compression is not None or unit.start == 0:
            return 0
        if unit_index not in self._line_base:
            count = 0
            with open(f.path, "rb") as fh:
                remaining = unit.start - 1
                while remaining > 0:
                    chunk = fh.read(min(1 << 24, remaining))
                    count += chunk.count(b"\n")
                    remaining -= len(chunk)
            self._line_base[unit_index] = count + 1
        return self._line_base[unit_index]
