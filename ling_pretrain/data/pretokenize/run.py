"""Pretokenize text corpora into megatron-core indexed datasets (``.bin`` / ``.idx``).

The tokenizer is the slowest part of the pipeline by far, so everything else is arranged
around keeping it busy:

* The main process only reads: it cuts JSONL files into blocks of whole lines and reads
  Parquet/Arrow record batches and text files, without parsing anything. Worker processes
  (``spawn``ed, one tokenizer thread each) decode, validate and tokenize a whole batch with
  ``Tokenizer.encode_batch_fast`` and send back one flat token array per batch.
* Results are written in input order, never completion order, so the output bytes do not
  depend on the number of workers.
* The ``.idx`` writer is our own (the format is a header and three arrays), which keeps
  megatron-core and torch out of the start-up path. A test checks the bytes against
  megatron-core's ``IndexedDatasetBuilder``.

Crash safety: a shard is written under temporary names, fsynced, and renamed ``.bin`` first
and ``.idx`` last, so an interrupted run never leaves a valid-looking index over partial data.
After every finished shard the manifest records it together with a fingerprint of the inputs,
the tokenizer and the options, and the position in the input where the next shard starts; a
rerun with the same fingerprint keeps the finished shards and continues from there.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import math
import os
import re
import struct
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ling_pretrain.data.indexed import (
    DTYPE_CODES,
    FORMAT_VERSION,
    INDEX_HEADER,
    index_size,
    manifest_path,
    part_prefix,
    read_manifest,
)

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("skip", "fail")
DTYPE_CHOICES = ("auto", "uint16", "int32")

SKIP_REASONS = {
    "malformed_json": "line is not valid JSON",
    "not_object": "JSON value is not an object",
    "missing_key": "text key is missing",
    "non_string": "text value is not a string",
    "empty": "document is empty",
    "invalid_utf8": "text is not valid UTF-8",
}
"""Why a record can be skipped, with the cause printed in errors."""

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
DEFAULT_TEXT_SUFFIXES = (".txt",)
HF_DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")

DEFAULT_MAX_SHARD_BYTES = 16 * 2**30
"""Default ``.bin`` size limit of one output shard (16 GiB)."""
MAX_UNIT_BYTES = 2**30
"""Plain JSONL files are read in pieces of at most this many bytes (the resume granularity)."""
MIN_SPLIT_BYTES = 16 * 2**20
"""With ``num_shards > 1`` pieces are made smaller, but not below this, to balance tasks."""

_SHARD_RE = r"_\d{5}"


class PretokenizeError(Exception):
    """An error the user can fix (bad path, tokenizer, option or input record)."""


@dataclass(frozen=True, kw_only=True)
class PretokenizeOptions:
    """Everything one pretokenization run needs."""

    inputs: Sequence[str]
    """Files or directories: JSONL (plain, .gz, .zst), Parquet, text files, Hugging Face
    ``save_to_disk`` directories; directories are searched recursively in sorted order."""
    tokenizer_dir: str
    """A Hugging Face tokenizer directory with ``tokenizer.json``."""
    output_prefix: str
    """Output path prefix, without ``.bin``/``.idx``."""
    text_key: str = "text"
    """Field (JSONL) or column (Parquet/Arrow) holding the document text."""
    workers: int = 1
    """Tokenizer worker processes; 1 tokenizes in this process."""
    on_error: str = "skip"
    """``skip``: count bad records and go on; ``fail``: stop at the first one."""
    num_shards: int = 1
    """Split the input between this many independent runs (e.g. a Slurm job array)."""
    shard_index: int = 0
    """Which of the ``num_shards`` parts this run tokenizes (0-based)."""
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    """Start a new output shard before its ``.bin`` would grow beyond this many bytes."""
    dtype: str = "auto"
    """Token dtype on disk: ``auto`` (uint16 below 65,500 ids, else int32), ``uint16``,
    ``int32``."""
    eod_token: str | None = None
    """End-of-document token; null reads ``eos_token`` from the tokenizer directory."""
    allow_special_tokens: bool = False
    """Turn special-token strings found in the text (e.g. a literal ``<|endoftext|>``) into
    their ids. Off by default, so document text can never fake a document boundary."""
    text_suffixes: Sequence[str] = DEFAULT_TEXT_SUFFIXES
    """File suffixes read as one plain-text document per file when found in a directory
    (a file named explicitly with an unknown suffix is always read as text)."""
    input_split_bytes: int | None = None
    """Size of the pieces plain JSONL files are cut into; null chooses it from the input
    size and ``num_shards``."""
    batch_bytes: int = 1 << 20
    """Input bytes handed to a worker at a time."""
    batch_records: int = 1024
    """At most this many records handed to a worker at a time."""
    progress: bool = True
    """Show a progress bar on stderr."""

    @property
    def run_prefix(self) -> str:
        """The prefix this run writes: the output prefix, or its part for ``num_shards > 1``."""
        if self.num_shards == 1:
            return self.output_prefix
        return part_prefix(self.output_prefix, self.shard_index, self.num_shards)


@dataclass(frozen=True)
class TokenizerInfo:
    """What pretokenization needs to know about a tokenizer directory."""

    tokenizer_json: str
    eod_token: str
    eod_id: int
    cardinality: int
    """Largest token id plus one."""
    sha256: str


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
class _Unit:
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


@dataclass
class _Batch:
    kind: str
    """``jsonl`` (payload: bytes of whole lines) or ``values`` (payload: list or Arrow array)."""
    payload: Any
    segments: list[tuple[int, int, int]]
    """(unit index, first record in the unit, record count), in record order."""
    nbytes: int

    @property
    def n_records(self) -> int:
        return sum(s[2] for s in self.segments)

    def position(self, offset: int) -> tuple[int, int]:
        """(unit, record) of the record at ``offset`` in this batch (may be one past the end)."""
        for unit, first, count in self.segments:
            if offset < count:
                return unit, first + offset
            offset -= count
        unit, first, count = self.segments[-1]
        return unit, first + count


@dataclass
class _ShardRecord:
    prefix: str
    documents: int
    tokens: int
    bin_bytes: int
    end: tuple[int, int]
    skipped: dict[str, int]
    examples: list[dict[str, str]]
    fresh: bool = True
    """Written by this run (False: kept from an earlier one)."""


@dataclass
class PretokenizeSummary:
    """The outcome of a run; ``to_dict`` is what is printed and written to ``.summary.json``."""

    output_prefix: str
    prefixes: list[str]
    documents: int
    tokens: int
    dtype: str
    eod_id: int
    bytes_read: int
    skipped: dict[str, int]
    skipped_examples: list[dict[str, str]]
    seconds: float
    tokens_this_run: int
    shards_reused: int
    shards_written: int
    workers: int
    first_batch_seconds: float | None
    """From the call to the first tokenized batch: the fixed start-up cost."""

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skipped_total"] = sum(self.skipped.values())
        out["tokens_per_sec"] = round(self.tokens_per_sec, 1)
        out["mb_per_sec"] = round(self.bytes_read / 1e6 / self.seconds, 3) if self.seconds else 0.0
        out["seconds"] = round(self.seconds, 3)
        if self.first_batch_seconds is not None:
            out["first_batch_seconds"] = round(self.first_batch_seconds, 3)
        return out


# --------------------------------------------------------------------------- tokenizer


def _special_token_value(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer_info(tokenizer_dir: str, eod_token: str | None = None) -> TokenizerInfo:
    """Check a tokenizer directory and find its end-of-document token.

    Args:
        tokenizer_dir: Hugging Face tokenizer directory (``tokenizer.json`` inside).
        eod_token: Token string to use as end-of-document; None reads ``eos_token`` from
            ``tokenizer_config.json``, then ``special_tokens_map.json``.

    Returns:
        The tokenizer file, eod token and id, id cardinality and a hash of the tokenizer.

    Raises:
        PretokenizeError: when the directory, tokenizer.json or the eod token is missing.
    """
    if not os.path.isdir(tokenizer_dir):
        raise PretokenizeError(
            f"tokenizer directory not found: {tokenizer_dir!r}; pass --tokenizer a Hugging Face "
            "tokenizer directory (one saved with save_pretrained)"
        )
    tokenizer_json = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise PretokenizeError(
            f"{tokenizer_dir!r} has no tokenizer.json; only fast (Rust) Hugging Face tokenizers "
            "are supported: save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
        )
    source = "--eod-token"
    if eod_token is None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            meta = os.path.join(tokenizer_dir, name)
            if os.path.isfile(meta):
                with open(meta, encoding="utf-8") as f:
                    eod_token = _special_token_value(json.load(f).get("eos_token"))
                if eod_token is not None:
                    source = name
                    break
    if eod_token is None:
        raise PretokenizeError(
            f"no end-of-document token: neither tokenizer_config.json nor "
            f"special_tokens_map.json in {tokenizer_dir!r} names an eos_token; pass the token "
            "string with --eod-token (Ling: --eod-token '<|endoftext|>')"
        )
    with open(tokenizer_json, "rb") as f:
        raw = f.read()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    eod_id = tokenizer.token_to_id(eod_token)
    if eod_id is None:
        raise PretokenizeError(
            f"end-of-document token {eod_token!r} (from {source}) is not in the vocabulary of "
            f"{tokenizer_json}; pass an existing token with --eod-token"
        )
    cardinality = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    digest = hashlib.sha256(raw).hexdigest()
    return TokenizerInfo(tokenizer_json, eod_token, eod_id, cardinality, digest)


def choose_dtype(cardinality: int, requested: str = "auto") -> str:
    """The on-disk token dtype for ids below ``cardinality``.

    ``auto`` follows megatron-core's ``DType.optimal_dtype``: uint16 below 65,500 ids,
    otherwise int32.

    Raises:
        PretokenizeError: when the requested dtype cannot hold every token id.
    """
    if requested not in DTYPE_CHOICES:
        raise PretokenizeError(f"unknown dtype {requested!r}; choose one of {DTYPE_CHOICES}")
    if requested == "auto":
        return "uint16" if cardinality < 65500 else "int32"
    limit = int(np.iinfo(requested).max)
    if cardinality - 1 > limit:
        raise PretokenizeError(
            f"the tokenizer has token ids up to {cardinality - 1}, which do not fit in {requested} "
            f"(largest value {limit}); use --dtype int32 or --dtype auto"
        )
    return requested


# --------------------------------------------------------------------------- .idx format


def index_bytes(lengths: np.ndarray, dtype: str) -> bytes:
    """The megatron-core ``.idx`` file for documents of ``lengths`` tokens (one sequence each).

    Byte-identical to what ``IndexedDatasetBuilder.finalize`` writes for the same documents
    added with ``add_document(tokens, [len(tokens)])``.
    """
    lengths = np.asarray(lengths, dtype=np.int32)
    count = len(lengths)
    pointers = np.zeros(count, dtype=np.int64)
    if count > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    parts = [
        INDEX_HEADER,
        struct.pack("<Q", 1),
        struct.pack("<B", DTYPE_CODES[dtype]),
        struct.pack("<Q", count),
        struct.pack("<Q", count + 1),
        lengths.tobytes(),
        pointers.tobytes(),
        np.arange(count + 1, dtype=np.int64).tobytes(),
    ]
    return b"".join(parts)


def _fsync_dir(path: str) -> None:
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


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


class _ShardWriter:
    """Writes one shard under temporary names; ``finish`` publishes it atomically."""

    def __init__(self, tmp_prefix: str, dtype: str) -> None:
        self.tmp_prefix = tmp_prefix
        self.dtype = dtype
        self.file = open(f"{tmp_prefix}.bin.tmp", "wb")
        self.lengths: list[np.ndarray] = []
        self.documents = 0
        self.bin_bytes = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.file.write(memoryview(tokens).cast("B"))
        self.lengths.append(lengths)
        self.documents += len(lengths)
        self.bin_bytes += tokens.nbytes

    def finish(self, prefix: str) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        idx_tmp = f"{self.tmp_prefix}.idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(index_bytes(lengths, self.dtype))
            f.flush()
            os.fsync(f.fileno())
        # Drop any older index first: between the two renames below a new .bin must never
        # sit beside an old, valid-looking .idx.
        if os.path.exists(f"{prefix}.idx"):
            os.unlink(f"{prefix}.idx")
        os.replace(f"{self.tmp_prefix}.bin.tmp", f"{prefix}.bin")
        os.replace(idx_tmp, f"{prefix}.idx")
        _fsync_dir(os.path.dirname(os.path.abspath(prefix)))

    def abort(self) -> None:
        self.file.close()
        for suffix in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.tmp_prefix + suffix):
                os.unlink(self.tmp_prefix + suffix)


# --------------------------------------------------------------------------- inputs


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


def _plan_units(files: Sequence[InputFile], split_bytes: int) -> list[_Unit]:
    units = []
    for index, f in enumerate(files):
        if f.kind == "jsonl" and f.compression is None and f.size > split_bytes:
            pieces = math.ceil(f.size / split_bytes)
            step = math.ceil(f.size / pieces)
            for start in range(0, f.size, step):
                end = min(start + step, f.size)
                units.append(_Unit(index, start, end, weight=end - start))
        elif f.kind == "jsonl" and f.compression is None:
            units.append(_Unit(index, 0, f.size, weight=f.size))
        elif f.kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(f.path).metadata
            total_rows = max(meta.num_rows, 1)
            row_base = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                weight = f.size * rows // total_rows
                units.append(_Unit(index, group, group + 1, row_base, weight))
                row_base += rows
        else:
            units.append(_Unit(index, weight=f.size))
    return units


def _select_units(units: list[_Unit], num_shards: int, shard_index: int) -> list[int]:
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


# --------------------------------------------------------------------------- reading


def _open_binary(f: InputFile):
    if f.compression == "gzip":
        import gzip

        return gzip.open(f.path, "rb")
    if f.compression == "zstd":
        import io

        import zstandard

        raw = open(f.path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(f.path, "rb")


def _jsonl_blobs(f: InputFile, unit: _Unit, block: int) -> Iterator[bytes]:
    """Blocks of whole lines of one JSONL unit; every block ends with a newline."""
    with _open_binary(f) as fh:
        if f.compression is None and unit.start > 0:
            fh.seek(unit.start - 1)
            fh.readline()
        pos = fh.tell() if f.compression is None else 0
        end = unit.end if f.compression is None else None
        while end is None or pos < end:
            blob = fh.read(block if end is None else min(block, end - pos))
            if not blob:
                break
            if not blob.endswith(b"\n"):
                blob += fh.readline()
                if not blob.endswith(b"\n"):
                    blob += b"\n"
            pos += len(blob)
            yield blob


def _drop_lines(blob: bytes, count: int) -> bytes:
    cut = -1
    for _ in range(count):
        cut = blob.index(b"\n", cut + 1)
    return blob[cut + 1 :]


def _read_unit(
    files: Sequence[InputFile],
    unit_index: int,
    unit: _Unit,
    text_key: str,
    skip: int,
    options: PretokenizeOptions,
) -> Iterator[_Batch]:
    """Batches of one unit, leaving out its first ``skip`` records (resume)."""
    f = files[unit.file]
    record = 0
    if f.kind == "jsonl":
        for blob in _jsonl_blobs(f, unit, options.batch_bytes):
            count = blob.count(b"\n")
            if skip:
                if count <= skip:
                    skip -= count
                    record += count
                    continue
                blob = _drop_lines(blob, skip)
                record += skip
                count -= skip
                skip = 0
            yield _Batch("jsonl", blob, [(unit_index, record, count)], len(blob))
            record += count
    elif f.kind == "text":
        if skip == 0:
            with open(f.path, "rb") as fh:
                data = fh.read()
            yield _Batch("values", [data], [(unit_index, 0, 1)], len(data))
    else:
        for column, rows in _arrow_batches(f, unit, text_key, options.batch_records):
            if skip >= rows:
                skip -= rows
                record += rows
                continue
            if skip:
                column = column[skip:] if column is not None else None
                record += skip
                rows -= skip
                skip = 0
            payload = column if column is not None else rows
            nbytes = column.nbytes if column is not None else 0
            yield _Batch("values", payload, [(unit_index, record, rows)], nbytes)
            record += rows


def _arrow_batches(
    f: InputFile, unit: _Unit, text_key: str, rows: int
) -> Iterator[tuple[Any, int]]:
    """(text column or None when absent, row count) per record batch of a Parquet/Arrow unit."""
    import pyarrow as pa

    if f.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        has_key = text_key in pf.schema_arrow.names
        groups = list(range(unit.start, unit.end))
        if not has_key:
            for group in groups:
                yield None, pf.metadata.row_group(group).num_rows
            return
        for batch in pf.iter_batches(batch_size=rows, row_groups=groups, columns=[text_key]):
            yield batch.column(0), batch.num_rows
        return
    source = pa.memory_map(f.path)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
        batches = reader
    for batch in batches:
        index = batch.schema.get_field_index(text_key)
        yield (batch.column(index) if index >= 0 else None), batch.num_rows


def _merge_batches(batches: Iterable[_Batch], max_bytes: int, max_records: int) -> Iterator[_Batch]:
    """Join small consecutive batches of the same kind (small files) up to the batch limits."""
    pending: list[_Batch] = []
    size = records = 0
    for batch in batches:
        mergeable = batch.kind == "jsonl" or isinstance(batch.payload, list)
        if pending and (
            not mergeable
            or batch.kind != pending[0].kind
            or size + batch.nbytes > max_bytes
            or records + batch.n_records > max_records
        ):
            yield _join(pending)
            pending, size, records = [], 0, 0
        if not mergeable:
            yield batch
            continue
        pending.append(batch)
        size += batch.nbytes
        records += batch.n_records
    if pending:
        yield _join(pending)


def _join(batches: list[_Batch]) -> _Batch:
    if len(batches) == 1:
        return batches[0]
    segments = [s for b in batches for s in b.segments]
    nbytes = sum(b.nbytes for b in batches)
    if batches[0].kind == "jsonl":
        return _Batch("jsonl", b"".join(b.payload for b in batches), segments, nbytes)
    return _Batch("values", [v for b in batches for v in b.payload], segments, nbytes)


# --------------------------------------------------------------------------- tokenizing


class _Encoder:
    """Decodes, validates and tokenizes batches; one per worker process."""

    def __init__(
        self, tokenizer_json: str, eod_id: int, dtype: str, text_key: str, allow_special: bool
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.tokenizer.encode_special_tokens = not allow_special
        self.eod_id = eod_id
        self.dtype = np.dtype(dtype)
        self.text_key = text_key

    def __call__(self, kind: str, payload: Any) -> tuple:
        """Tokenize one batch.

        Returns:
            (tokens, lengths, kept record offsets, errors); ``tokens`` holds every kept
            document followed by the end-of-document id, ``lengths`` counts that id, and each
            error is (record offset, reason, detail, line within the record or 0).
        """
        errors: list[tuple[int, str, str, int]] = []
        if kind == "jsonl":
            texts, kept = self._from_jsonl(payload, errors)
        else:
            texts, kept = self._from_values(payload, errors)
        try:
            encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        except Exception:
            texts, kept = self._drop_unencodable(texts, kept, errors)
            encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        errors.sort()
        ids = [e.ids for e in encodings]
        body_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        body = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(body_lengths.sum())
        )
        tokens = np.insert(body, np.cumsum(body_lengths), self.eod_id)
        lengths = (body_lengths + 1).astype(np.int32)
        return tokens, lengths, np.asarray(kept, dtype=np.int64), errors

    def _check_text(self, offset: int, value: Any, errors: list) -> bool:
        if not isinstance(value, str):
            errors.append((offset, "non_string", f"got {type(value).__name__}", 0))
            return False
        if not value:
            errors.append((offset, "empty", "", 0))
            return False
        return True

    def _from_jsonl(self, blob: bytes, errors: list) -> tuple[list[str], list[int]]:
        try:
            lines: list[Any] = blob.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = blob.split(b"\n")
        lines.pop()
        texts, kept = [], []
        key = self.text_key
        for offset, line in enumerate(lines):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    errors.append(
                        (offset, "invalid_utf8", f"invalid byte at column {exc.start + 1}", 0)
                    )
                    continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                if not line.strip():
                    errors.append((offset, "empty", "blank line", 0))
                else:
                    errors.append((offset, "malformed_json", str(exc), 0))
                continue
            if not isinstance(obj, dict):
                errors.append((offset, "not_object", f"got {type(obj).__name__}", 0))
                continue
            if key not in obj:
                errors.append((offset, "missing_key", f"no {key!r} key", 0))
                continue
            if self._check_text(offset, obj[key], errors):
                texts.append(obj[key])
                kept.append(offset)
        return texts, kept

    def _from_values(self, payload: Any, errors: list) -> tuple[list[str], list[int]]:
        if isinstance(payload, int):
            errors.extend(
                (i, "missing_key", f"no {self.text_key!r} column", 0) for i in range(payload)
            )
            return [], []
        values = payload if isinstance(payload, list) else payload.to_pylist()
        texts, kept = [], []
        for offset, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    line = value.count(b"\n", 0, exc.start) + 1
                    errors.append(
                        (offset, "invalid_utf8", f"invalid byte at offset {exc.start}", line)
                    )
                    continue
            if self._check_text(offset, value, errors):
                texts.append(value)
                kept.append(offset)
        return texts, kept

    def _drop_unencodable(
        self, texts: list[str], kept: list[int], errors: list
    ) -> tuple[list[str], list[int]]:
        good_texts, good_kept = [], []
        for text, offset in zip(texts, kept, strict=True):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                errors.append(
                    (offset, "invalid_utf8", f"unpaired surrogate at character {exc.start}", 0)
                )
                continue
            good_texts.append(text)
            good_kept.append(offset)
        return good_texts, good_kept


_WORKER_ENCODER: _Encoder | None = None


def _worker_init(*args: Any) -> None:
    # One tokenizer thread per worker process: the processes are the parallelism. The
    # tokenizer's own one-thread pool is measurably faster than TOKENIZERS_PARALLELISM=false,
    # so a false inherited from the caller is overridden too.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(*args)


def _worker_encode(kind: str, payload: Any) -> tuple:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(kind, payload)


def _encode_in_order(
    batches: Iterable[_Batch], workers: int, init_args: tuple
) -> Iterator[tuple[_Batch, tuple]]:
    """Tokenize batches with ``workers`` processes, yielding results in input order."""
    if workers <= 1:
        encoder = _Encoder(*init_args)
        for batch in batches:
            yield batch, encoder(batch.kind, batch.payload)
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the caller (e.g. a trainer) may hold threads or a used tokenizer pool.
    # An executor, not multiprocessing.Pool: a worker that dies breaks the executor with an
    # error, where a Pool would silently start a new worker and wait forever for the result.
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=init_args,
    )
    pending: deque[tuple[_Batch, Future]] = deque()
    try:
        for batch in batches:
            pending.append((batch, executor.submit(_worker_encode, batch.kind, batch.payload)))
            if len(pending) >= 3 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "a tokenizer worker process died (see its error above; out of memory?)"
        ) from exc
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- manifest


def _fingerprint(
    options: PretokenizeOptions,
    files: Sequence[InputFile],
    info: TokenizerInfo,
    dtype: str,
    split_bytes: int,
) -> str:
    material = {
        "format_version": FORMAT_VERSION,
        "inputs": [[f.path, f.kind, f.compression, f.size, f.mtime_ns] for f in files],
        "tokenizer_sha256": info.sha256,
        "eod_id": info.eod_id,
        "dtype": dtype,
        "text_key": options.text_key,
        "max_shard_bytes": options.max_shard_bytes,
        "num_shards": options.num_shards,
        "shard_index": options.shard_index,
        "split_bytes": split_bytes,
        "allow_special_tokens": options.allow_special_tokens,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _shard_is_valid(directory: str, entry: dict[str, Any]) -> bool:
    prefix = os.path.join(directory, entry["prefix"])
    try:
        return os.path.getsize(f"{prefix}.bin") == entry["bin_bytes"] and os.path.getsize(
            f"{prefix}.idx"
        ) == index_size(entry["documents"])
    except OSError:
        return False


def _write_manifest(
    prefix: str,
    fingerprint: str,
    dtype: str,
    eod_id: int,
    shards: list[_ShardRecord],
    complete: bool,
) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "fingerprint": fingerprint,
        "dtype": dtype,
        "eod_id": eod_id,
        "documents": sum(s.documents for s in shards),
        "tokens": sum(s.tokens for s in shards),
        "shards": [
            {
                "prefix": os.path.basename(s.prefix),
                "documents": s.documents,
                "tokens": s.tokens,
                "bin_bytes": s.bin_bytes,
                "end": list(s.end),
                "skipped": s.skipped,
                "examples": s.examples,
            }
            for s in shards
        ],
    }
    _write_atomic(manifest_path(prefix), (json.dumps(manifest, indent=1) + "\n").encode())


# --------------------------------------------------------------------------- driver


def _validate(options: PretokenizeOptions) -> None:
    if options.on_error not in ON_ERROR_CHOICES:
        raise PretokenizeError(f"on_error={options.on_error!r}; choose one of {ON_ERROR_CHOICES}")
    if options.num_shards < 1 or not 0 <= options.shard_index < options.num_shards:
        raise PretokenizeError(
            f"shard_index={options.shard_index} is outside 0..num_shards-1 with "
            f"num_shards={options.num_shards}"
        )
    if options.workers < 1:
        raise PretokenizeError(f"workers={options.workers}; use at least 1")
    if options.max_shard_bytes < 1:
        raise PretokenizeError(f"max_shard_bytes={options.max_shard_bytes}; use a positive size")
    if options.output_prefix.endswith((".bin", ".idx")):
        raise PretokenizeError(
            f"output prefix {options.output_prefix!r} ends with .bin/.idx; pass the prefix only"
        )
    if not options.inputs:
        raise PretokenizeError("no inputs given")


class _Locator:
    """Turns (unit, record) into ``file:line`` for messages."""

    def __init__(self, files: Sequence[InputFile], units: Sequence[_Unit]) -> None:
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


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.start = time.perf_counter()
        self.last = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit="doc", unit_scale=True, dynamic_ncols=True, desc="pretokenize")

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        if self.bar is None:
            return
        self.bar.update(documents)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"{tokens / elapsed / 1e6:.2f}M tok/s, {nbytes / elapsed / 1e6:.1f} MB/s",
                refresh=False,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Run:
    """State of one pretokenization run: the open shard and the finished ones."""

    def __init__(
        self,
        options: PretokenizeOptions,
        prefix: str,
        dtype: str,
        fingerprint: str,
        eod_id: int,
        locator: _Locator,
        reused: list[_ShardRecord],
    ) -> None:
        self.options = options
        self.prefix = prefix
        self.dtype = dtype
        self.itemsize = np.dtype(dtype).itemsize
        self.fingerprint = fingerprint
        self.eod_id = eod_id
        self.locate = locator
        self.shards = list(reused)
        self.writer: _ShardWriter | None = None
        self.shard_tokens = 0
        self.skipped: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []
        self.pending_errors: list[tuple[tuple[int, int], str, str, str]] = []
        self.end: tuple[int, int] = (0, 0)
        self.tokens_this_run = 0

    def _open(self) -> _ShardWriter:
        if self.writer is None:
            self.writer = _ShardWriter(f"{self.prefix}_{len(self.shards):05d}", self.dtype)
        return self.writer

    def _take_errors(self, before: tuple[int, int] | None) -> None:
        keep = []
        for position, reason, location, detail in self.pending_errors:
            if before is None or position < before:
                self.skipped[reason] += 1
                if len(self.examples) < 10:
                    self.examples.append({"where": location, "reason": reason, "detail": detail})
            else:
                keep.append((position, reason, location, detail))
        self.pending_errors = keep

    def consume(self, batch: _Batch, result: tuple) -> int:
        """Write one batch's documents, closing shards at the size limit; returns the tokens."""
        tokens, lengths, kept, errors = result
        for offset, reason, detail, line in errors:
            unit, record = batch.position(offset)
            location = self.locate(unit, record, line)
            if self.options.on_error == "fail":
                raise PretokenizeError(
                    f"{location}: {SKIP_REASONS[reason]} ({detail or reason}); fix the input or "
                    "pass --on-error skip to count and skip such records"
                )
            self.pending_errors.append(((unit, record), reason, location, detail))
        limit = self.options.max_shard_bytes
        byte_ends = np.cumsum(lengths.astype(np.int64)) * self.itemsize
        first = 0
        token_start = 0
        while first < len(lengths):
            written = self._open().bin_bytes
            done = byte_ends[first - 1] if first else 0
            last = first + int(
                np.searchsorted(byte_ends[first:] - done, limit - written, side="right")
            )
            if last == first and self.writer.documents == 0:
                last = first + 1
            if last > first:
                token_end = token_start + int((byte_ends[last - 1] - done) // self.itemsize)
                self.writer.write(tokens[token_start:token_end], lengths[first:last])
                self.shard_tokens += token_end - token_start
                self.end = batch.position(int(kept[last - 1]) + 1)
                token_start = token_end
                first = last
            if first < len(lengths):
                self._close(final=False)
        self.tokens_this_run += len(tokens)
        if len(lengths):
            self._take_errors(self.end)
        return len(tokens)

    def _close(self, final: bool) -> None:
        writer = self.writer
        assert writer is not None
        self._take_errors(None if final else self.end)
        index = len(self.shards)
        name = self.prefix if final and index == 0 else f"{self.prefix}_{index:05d}"
        writer.finish(name)
        record = _ShardRecord(
            name,
            writer.documents,
            self.shard_tokens,
            writer.bin_bytes,
            self.end,
            dict(self.skipped),
            self.examples,
        )
        self.shards.append(record)
        logger.info("wrote %s (%d documents, %d tokens)", name, record.documents, record.tokens)
        _write_manifest(
            self.prefix, self.fingerprint, self.dtype, self.eod_id, self.shards, complete=False
        )
        self.writer = None
        self.shard_tokens = 0
        self.skipped = Counter()
        self.examples = []

    def finish(self) -> None:
        if self.writer is not None:
            self._close(final=True)
        else:
            # Nothing was written: the counts of skipped records only reach the summary.
            self._take_errors(None)
        _write_manifest(
            self.prefix, self.fingerprint, self.dtype, self.eod_id, self.shards, complete=True
        )

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _remove_outputs(prefix: str, manifest: dict[str, Any]) -> None:
    """Delete the shards an earlier manifest lists (index first), then the manifest."""
    directory = os.path.dirname(prefix)
    for entry in manifest.get("shards", []):
        for suffix in (".idx", ".bin"):
            path = os.path.join(directory, entry["prefix"] + suffix)
            if os.path.exists(path):
                os.unlink(path)
    os.unlink(manifest_path(prefix))


def _remove_temporary_files(prefix: str) -> None:
    for tmp in glob.glob(f"{glob.escape(prefix)}_[0-9]*.*.tmp"):
        if re.fullmatch(re.escape(prefix) + _SHARD_RE + r"\.(bin|idx)\.tmp", tmp):
            os.unlink(tmp)


def pretokenize(options: PretokenizeOptions) -> PretokenizeSummary:
    """Tokenize the inputs into megatron-core indexed dataset shards.

    Writes ``<prefix>.bin/.idx`` (one shard) or ``<prefix>_NNNNN.bin/.idx`` (several), with
    ``<prefix>`` the output prefix or, with ``num_shards > 1``, its part
    ``<output_prefix>.partIIIII-of-KKKKK``; plus ``<prefix>.manifest.json`` and
    ``<prefix>.summary.json``. Finished shards of an earlier run with the same inputs,
    tokenizer and options are kept.

    Args:
        options: What to tokenize and how.

    Returns:
        The run's summary.

    Raises:
        PretokenizeError: for user errors (paths, tokenizer, options) before any work, and
            for the first bad record when ``on_error == "fail"``.
    """
    started = time.perf_counter()
    _validate(options)
    info = load_tokenizer_info(options.tokenizer_dir, options.eod_token)
    dtype = choose_dtype(info.cardinality, options.dtype)
    files = discover_inputs(options.inputs, options.text_suffixes)
    split_bytes = options.input_split_bytes
    if split_bytes is None:
        split_bytes = MAX_UNIT_BYTES
        if options.num_shards > 1:
            total = sum(f.size for f in files if f.kind == "jsonl" and f.compression is None)
            split_bytes = min(
                split_bytes, max(MIN_SPLIT_BYTES, math.ceil(total / (4 * options.num_shards)))
            )
    units = _plan_units(files, split_bytes)
    selected = _select_units(units, options.num_shards, options.shard_index)
    fingerprint = _fingerprint(options, files, info, dtype, split_bytes)

    prefix = os.path.abspath(options.run_prefix)
    directory = os.path.dirname(prefix)
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise PretokenizeError(f"cannot write to {directory!r}; choose another --output-prefix")
    manifest = read_manifest(prefix)
    reused: list[_ShardRecord] = []
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        for entry in manifest.get("shards", []):
            if not _shard_is_valid(directory, entry):
                break
            reused.append(
                _ShardRecord(
                    os.path.join(directory, entry["prefix"]),
                    entry["documents"],
                    entry["tokens"],
                    entry["bin_bytes"],
                    tuple(entry["end"]),
                    entry["skipped"],
                    entry["examples"],
                    fresh=False,
                )
            )
        if manifest.get("complete") and len(reused) == len(manifest.get("shards", [])):
            logger.info("%s is up to date; nothing to do", prefix)
            return _summarize(
                options, prefix, reused, info, dtype, seconds=time.perf_counter() - started
            )
        if reused:
            logger.info("resuming %s after %d finished shards", prefix, len(reused))
    elif manifest is not None:
        logger.info("inputs, tokenizer or options changed since %s was written; redoing it", prefix)
        _remove_outputs(prefix, manifest)
    _remove_temporary_files(prefix)

    resume_unit, resume_record = reused[-1].end if reused else (0, 0)
    run = _Run(options, prefix, dtype, fingerprint, info.eod_id, _Locator(files, units), reused)
    if reused:
        run.end = (resume_unit, resume_record)

    def batches() -> Iterator[_Batch]:
        for unit_index in selected:
            if unit_index < resume_unit:
                continue
            skip = resume_record if unit_index == resume_unit else 0
            yield from _read_unit(
                files, unit_index, units[unit_index], options.text_key, skip, options
            )

    init_args = (
        info.tokenizer_json,
        info.eod_id,
        dtype,
        options.text_key,
        options.allow_special_tokens,
    )
    progress = _Progress(options.progress)
    bytes_read = 0
    first_batch_seconds = None
    try:
        merged = _merge_batches(batches(), options.batch_bytes, options.batch_records)
        for batch, result in _encode_in_order(merged, options.workers, init_args):
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - started
            run.consume(batch, result)
            bytes_read += batch.nbytes
            progress.update(len(result[1]), run.tokens_this_run, bytes_read)
        run.finish()
    except BaseException:
        run.abort()
        raise
    finally:
        progress.close()
    summary = _summarize(
        options,
        prefix,
        run.shards,
        info,
        dtype,
        seconds=time.perf_counter() - started,
        bytes_read=bytes_read,
        tokens_this_run=run.tokens_this_run,
        unwritten_skips=run.skipped,
        first_batch_seconds=first_batch_seconds,
    )
    if not run.shards:
        logger.warning(
            "no documents were written for %s (every record was skipped or the input is empty)",
            prefix,
        )
    _write_atomic(
        f"{prefix}.summary.json", (json.dumps(summary.to_dict(), indent=1) + "\n").encode()
    )
    return summary


def _summarize(
    options: PretokenizeOptions,
    prefix: str,
    shards: list[_ShardRecord],
    info: TokenizerInfo,
    dtype: str,
    *,
    seconds: float,
    bytes_read: int = 0,
    tokens_this_run: int = 0,
    unwritten_skips: dict[str, int] | None = None,
    first_batch_seconds: float | None = None,
) -> PretokenizeSummary:
    """The summary of ``shards`` plus what this run read; ``unwritten_skips`` counts skipped
    records that belong to no shard (nothing was written)."""
    skipped: Counter[str] = Counter(unwritten_skips or {})
    examples: list[dict[str, str]] = []
    for shard in shards:
        skipped.update(shard.skipped)
        examples.extend(shard.examples)
    return PretokenizeSummary(
        output_prefix=prefix,
        prefixes=[s.prefix for s in shards],
        documents=sum(s.documents for s in shards),
        tokens=sum(s.tokens for s in shards),
        dtype=dtype,
        eod_id=info.eod_id,
        bytes_read=bytes_read,
        skipped=dict(sorted(skipped.items())),
        skipped_examples=examples[:20],
        seconds=seconds,
        tokens_this_run=tokens_this_run,
        shards_reused=sum(1 for s in shards if not s.fresh),
        shards_written=sum(1 for s in shards if s.fresh),
        workers=options.workers,
        first_batch_seconds=first_batch_seconds,
    )
