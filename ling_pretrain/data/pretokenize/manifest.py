"""The manifest of a run: the finished shards, where the next one starts, and the fingerprint.

After every finished shard the manifest records it together with a fingerprint of the
inputs, the tokenizer and the options, and the position in the input where the next shard
starts; a rerun with the same fingerprint keeps the finished shards and continues from
there. The reading side (which training uses) is :mod:`ling_pretrain.data.indexed`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.data.indexed import FORMAT_VERSION, MANIFEST_SUFFIX, index_size, manifest_path
from ling_pretrain.data.pretokenize.encode import TokenizerInfo
from ling_pretrain.data.pretokenize.inputs import InputFile
from ling_pretrain.data.pretokenize.options import PretokenizeOptions

logger = logging.getLogger(__name__)

SUMMARY_SUFFIX = ".summary.json"
"""The run's summary, ``<prefix>.summary.json``, sits beside its manifest."""
_SHARD_RE = r"(_\d{5})"
"""What a shard's name adds to the run's prefix when the run has several shards."""


@dataclass
class ShardRecord:
    """One finished shard, as the manifest records it."""

    prefix: str
    """The shard's dataset prefix (absolute; the manifest keeps its base name)."""
    documents: int
    tokens: int
    bin_bytes: int
    end: tuple[int, int]
    """(unit, record) where the next shard starts: the resume position."""
    skipped: dict[str, int]
    """Records skipped inside this shard, by reason."""
    examples: list[dict[str, str]]
    """The first skipped records: ``where`` (file:line), ``reason``, ``detail``."""
    fresh: bool = True
    """Written by this run (False: kept from an earlier one)."""


def run_fingerprint(
    options: PretokenizeOptions,
    files: Sequence[InputFile],
    info: TokenizerInfo,
    dtype: str,
    split_bytes: int,
) -> str:
    """A hash of everything that decides the output bytes: the input files (path, size,
    modification time), the tokenizer, the eod id and the options that change the output.
    Workers and batch sizes are left out: the bytes do not depend on them."""
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


def finished_shards(directory: str, manifest: dict[str, Any]) -> list[ShardRecord]:
    """The shards ``manifest`` lists whose files are intact, up to the first one that is not."""
    shards = []
    for entry in manifest.get("shards", []):
        if not _shard_is_valid(directory, entry):
            break
        shards.append(
            ShardRecord(
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
    return shards


def write_manifest(
    prefix: str,
    fingerprint: str,
    dtype: str,
    eod_id: int,
    shards: list[ShardRecord],
    complete: bool,
    failed: str | None = None,
) -> None:
    """Atomically (re)write ``<prefix>.manifest.json`` listing ``shards``; ``failed`` says
    why an unfinished run stopped."""
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
    if failed is not None:
        manifest["failed"] = failed
    atomic_write_text(manifest_path(prefix), json.dumps(manifest, indent=1) + "\n", sync_dir=True)


def remove_outputs(prefix: str, manifest: dict[str, Any]) -> None:
    """Delete the shards an earlier manifest of ``prefix`` lists (index first), then the
    manifest.

    Only names a shard of this prefix can have (``<prefix>`` and ``<prefix>_NNNNN``, with
    ``.bin``/``.idx``) are deleted, so an edited or copied manifest cannot make a rerun
    delete anything else.
    """
    directory, name = os.path.split(prefix)
    own = re.compile(re.escape(name) + _SHARD_RE + "?")
    for entry in manifest.get("shards", []):
        shard = entry.get("prefix") if isinstance(entry, dict) else None
        if not isinstance(shard, str) or not own.fullmatch(shard):
            logger.warning(
                "%s lists %r, which is not a shard name of %s; not deleting it",
                manifest_path(prefix),
                shard,
                prefix,
            )
            continue
        for suffix in (".idx", ".bin"):
            path = os.path.join(directory, shard + suffix)
            if os.path.exists(path):
                os.unlink(path)
    os.unlink(manifest_path(prefix))


def remove_temporary_files(prefix: str) -> None:
    """Delete the temporary files an interrupted run left for ``prefix``: those of its
    shards (``<prefix>_NNNNN.bin/.idx``), its manifest and its summary, and nothing else."""
    names = rf"({_SHARD_RE}\.(bin|idx)|{re.escape(MANIFEST_SUFFIX)}|{re.escape(SUMMARY_SUFFIX)})"
    pattern = re.compile(re.escape(prefix) + names + r"\.tmp\d*")
    for path in glob.glob(f"{glob.escape(prefix)}*.tmp*"):
        if pattern.fullmatch(path):
            os.unlink(path)
