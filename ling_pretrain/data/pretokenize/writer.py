"""Writing one shard: the ``.bin`` token stream and its megatron-core ``.idx`` file.

The ``.idx`` writer is our own (the format is a header and three arrays), which keeps
megatron-core and torch out of the start-up path; a test checks the bytes against
megatron-core's ``IndexedDatasetBuilder``. A shard is written under temporary names,
fsynced, and renamed ``.bin`` first and ``.idx`` last, so an interrupted run never leaves a
valid-looking index over partial data.
"""

from __future__ import annotations

import glob
import os
import re
import struct

import numpy as np

from ling_pretrain.data.indexed import DTYPE_CODES, INDEX_HEADER

_SHARD_RE = r"_\d{5}"


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


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


class ShardWriter:
    """Writes one shard under temporary names; ``finish`` publishes it atomically.

    The documents are appended to ``<tmp_prefix>.bin.tmp`` as they come; the ``.idx`` is
    written at the end, when all lengths are known.
    """

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


def remove_temporary_files(prefix: str) -> None:
    """Delete the temporary shard files an interrupted run left for ``prefix``."""
    for tmp in glob.glob(f"{glob.escape(prefix)}_[0-9]*.*.tmp"):
        if re.fullmatch(re.escape(prefix) + _SHARD_RE + r"\.(bin|idx)\.tmp", tmp):
            os.unlink(tmp)
