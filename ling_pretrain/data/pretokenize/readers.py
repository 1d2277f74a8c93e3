"""Reading units into batches of raw records, without parsing them.

JSONL is cut into blocks of whole lines, Parquet and Arrow are read as record batches of the
text column, a text file is one record. Decoding and validation happen in the tokenizer
workers (:mod:`.encode`), so the main process only moves bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ling_pretrain.data.pretokenize.inputs import InputFile, Unit, unreadable


@dataclass
class Batch:
    """Records handed to a tokenizer worker in one piece, with where each came from."""

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


def _jsonl_blobs(f: InputFile, unit: Unit, block: int) -> Iterator[bytes]:
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


def read_unit(
    files: Sequence[InputFile],
    unit_index: int,
    unit: Unit,
    text_key: str,
    skip: int,
    batch_bytes: int,
    batch_records: int,
) -> Iterator[Batch]:
    """Batches of one unit, leaving out its first ``skip`` records (resume).

    JSONL is read in blocks of about ``batch_bytes``, Parquet and Arrow in record batches of
    at most ``batch_records`` rows.

    Raises:
        PretokenizeError: naming the file, when it cannot be read or decompressed.
    """
    f = files[unit.file]
    try:
        yield from _read_unit(f, unit_index, unit, text_key, skip, batch_bytes, batch_records)
    except (OSError, EOFError, ValueError, *_library_errors(f)) as exc:
        raise unreadable(f.path, exc) from None


def _library_errors(f: InputFile) -> tuple[type[BaseException], ...]:
    """The errors the decompressor or Arrow raise for a damaged file of this kind."""
    if f.compression == "zstd":
        import zstandard

        return (zstandard.ZstdError,)
    if f.kind in ("parquet", "arrow"):
        import pyarrow as pa

        return (pa.ArrowException,)
    return ()


def _read_unit(
    f: InputFile,
    unit_index: int,
    unit: Unit,
    text_key: str,
    skip: int,
    batch_bytes: int,
    batch_records: int,
) -> Iterator[Batch]:
    record = 0
    if f.kind == "jsonl":
        for blob in _jsonl_blobs(f, unit, batch_bytes):
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
            yield Batch("jsonl", blob, [(unit_index, record, count)], len(blob))
            record += count
    elif f.kind == "text":
        if skip == 0:
            with open(f.path, "rb") as fh:
                data = fh.read()
            yield Batch("values", [data], [(unit_index, 0, 1)], len(data))
    else:
        for column, rows in _arrow_batches(f, unit, text_key, batch_records):
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
            yield Batch("values", payload, [(unit_index, record, rows)], nbytes)
            record += rows


def _arrow_batches(f: InputFile, unit: Unit, text_key: str, rows: int) -> Iterator[tuple[Any, int]]:
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


def merge_batches(batches: Iterable[Batch], max_bytes: int, max_records: int) -> Iterator[Batch]:
    """Join small consecutive batches of the same kind (small files) up to the batch limits."""
    pending: list[Batch] = []
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


def _join(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    segments = [s for b in batches for s in b.segments]
    nbytes = sum(b.nbytes for b in batches)
    if batches[0].kind == "jsonl":
        return Batch("jsonl", b"".join(b.payload for b in batches), segments, nbytes)
    return Batch("values", [v for b in batches for v in b.payload], segments, nbytes)
