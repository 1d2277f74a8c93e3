"""Reading pretokenized output: which shards an output prefix holds, and the ``.idx`` layout.

Training needs only this module to find the data that ``data_tools/pretokenize.py`` wrote;
the pretokenizer (:mod:`ling_pretrain.data.pretokenize`) imports its format constants from
here, never the reverse, so reading data does not load the writer.

A pretokenize run with output prefix ``P`` writes one shard ``P.bin/.idx`` or several,
``P_00000.bin/.idx``, ``P_00001.bin/.idx``, ..., and a manifest ``P.manifest.json`` listing
them in order. A run split into ``K`` parts (a Slurm job array) writes each part under
``P.partIIIII-of-KKKKK`` with its own manifest. A manifest is complete only when its run
finished; an unfinished one is never read as data.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the meaning of the output or of a manifest position changes."""

INDEX_HEADER = b"MMIDIDX\x00\x00"
"""The first bytes of a megatron-core ``.idx`` file."""
DTYPE_CODES = {"uint16": 8, "int32": 4}
"""megatron-core's ``.idx`` codes of the token dtypes the pretokenizer writes."""
MANIFEST_SUFFIX = ".manifest.json"


class ManifestError(ValueError):
    """An output prefix that does not name finished pretokenized data."""


def index_size(documents: int) -> int:
    """Size in bytes of the ``.idx`` file for ``documents`` single-sequence documents."""
    return len(INDEX_HEADER) + 8 + 1 + 8 + 8 + documents * (4 + 8) + (documents + 1) * 8


def manifest_path(prefix: str) -> str:
    """The manifest of the run that wrote ``prefix``."""
    return f"{prefix}{MANIFEST_SUFFIX}"


def part_prefix(output_prefix: str, index: int, total: int) -> str:
    """The prefix of part ``index`` of ``total`` of a split run: ``P.partIIIII-of-KKKKK``."""
    return f"{output_prefix}.part{index:05d}-of-{total:05d}"


def read_manifest(prefix: str) -> dict[str, Any] | None:
    """The manifest of ``prefix`` as a dict; None when there is none or it is unreadable."""
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        logger.warning("ignoring unreadable manifest %s", path)
        return None
    return manifest if isinstance(manifest, dict) else None


def collect_prefixes(output_prefix: str) -> list[str]:
    """All dataset prefixes written for ``output_prefix``, in order, for training configs.

    Reads ``P.manifest.json`` or, for runs split with ``num_shards``, every
    ``P.partIIIII-of-KKKKK.manifest.json``.

    Raises:
        ManifestError: when no manifest exists or a part is missing or unfinished.
    """
    manifest = read_manifest(output_prefix)
    if manifest is not None:
        parts = [(output_prefix, manifest)]
    else:
        pattern = f"{glob.escape(output_prefix)}.part[0-9]*-of-[0-9]*{MANIFEST_SUFFIX}"
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise ManifestError(f"no manifest found for {output_prefix!r}: run pretokenize first")
        suffix = re.escape(MANIFEST_SUFFIX)
        totals = {int(re.search(rf"-of-(\d+){suffix}$", p).group(1)) for p in paths}
        if len(totals) != 1:
            raise ManifestError(f"parts of {output_prefix!r} disagree on the number of shards")
        total = totals.pop()
        parts = []
        missing = []
        for index in range(total):
            prefix = part_prefix(output_prefix, index, total)
            part = read_manifest(prefix)
            if part is None:
                missing.append(index)
            else:
                parts.append((prefix, part))
        if missing:
            raise ManifestError(f"parts {missing} of {output_prefix!r} have not been written yet")
    prefixes = []
    for prefix, part in parts:
        if not part.get("complete"):
            if part.get("failed"):
                raise ManifestError(
                    f"{manifest_path(prefix)} is unfinished: its pretokenize run failed "
                    f"({part['failed']}); fix the input and rerun it"
                )
            raise ManifestError(f"{manifest_path(prefix)} is unfinished: rerun its pretokenize job")
        directory = os.path.dirname(os.path.abspath(prefix))
        prefixes.extend(os.path.join(directory, s["prefix"]) for s in part["shards"])
    return prefixes


def read_document_tokens(prefix: str) -> list[int]:
    """Tokens of each document of the megatron indexed dataset ``prefix`` (from its ``.idx``).

    Raises:
        ValueError: the ``.idx`` is not a megatron indexed-dataset index.
    """
    import numpy as np

    path = prefix + ".idx"
    with open(path, "rb") as f:
        if f.read(len(INDEX_HEADER)) != INDEX_HEADER:
            raise ValueError(f"{path} is not a megatron indexed-dataset index")
        f.read(8 + 1)  # version, dtype code
        sequences = int.from_bytes(f.read(8), "little")
        documents = int.from_bytes(f.read(8), "little")
        lengths = np.frombuffer(f.read(4 * sequences), dtype=np.int32)
        f.seek(8 * sequences, os.SEEK_CUR)  # sequence pointers
        bounds = np.frombuffer(f.read(8 * documents), dtype=np.int64)
    if len(lengths) != sequences or len(bounds) != documents:
        raise ValueError(f"{path} is truncated")
    cumulative = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return [
        int(cumulative[b] - cumulative[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
