"""Writing one shard: the ``.bin`` token stream and its megatron-core ``.idx`` file.

The ``.idx`` writer is our own (the format is a header and three arrays), which keeps
megatron-core and torch out of the start-up path; a test checks the bytes against
megatron-core's ``IndexedDatasetBuilder``. A shard is written under temporary names,
fsynced, and renamed ``.bin`` first and ``.idx`` last, so an interrupted run never leaves a
valid-looking index over partial data.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from ling_pretrain.core.io import atomic_open
from ling_pretrain.data.indexed import DTYPE_CODES, INDEX_HEADER


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


class ShardWriter:
    """Writes one shard under temporary names; ``finish`` publishes it atomically.

    The documents are appended to the temporary file of ``<tmp_prefix>.bin`` as they come
    (:func:`ling_pretrain.core.io.atomic_open` names it); the ``.idx`` is written at the
    end, when all lengths are known. The shard may be published under another prefix than
    the one it was started under (a run's only shard drops the ``_00000``).
    """

    def __init__(self, tmp_prefix: str, dtype: str) -> None:
        self.tmp_prefix = tmp_prefix
        self.dtype = dtype
        self.bin = atomic_open(f"{tmp_prefix}.bin", "wb")
        self.lengths: list[np.ndarray] = []
        self.documents = 0
        self.bin_bytes = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.bin.file.write(memoryview(tokens).cast("B"))
        self.lengths.append(lengths)
        self.documents += len(lengths)
        self.bin_bytes += tokens.nbytes

    def finish(self, prefix: str) -> None:
        """Publish the shard as ``<prefix>.bin/.idx``: ``.bin`` first, ``.idx`` last, each
        fsynced before its rename, then the directory."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        index = atomic_open(f"{self.tmp_prefix}.idx", "wb", sync_dir=True)
        try:
            index.file.write(index_bytes(lengths, self.dtype))
            # Drop any older index first: between the two renames a new .bin must never
            # sit beside an old, valid-looking .idx.
            if os.path.exists(f"{prefix}.idx"):
                os.unlink(f"{prefix}.idx")
            self.bin.commit(f"{prefix}.bin")
        except BaseException:
            index.discard()
            raise
        index.commit(f"{prefix}.idx")

    def abort(self) -> None:
        """Remove the temporary files; nothing is published."""
        self.bin.discard()
