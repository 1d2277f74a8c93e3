"""What a pretokenization run is asked to do: its options, their checks, and the user's error."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ling_pretrain.data.indexed import part_prefix

ON_ERROR_CHOICES = ("skip", "fail")
DTYPE_CHOICES = ("auto", "uint16", "int32")
DEFAULT_TEXT_SUFFIXES = (".txt",)
DEFAULT_MAX_SHARD_BYTES = 16 * 2**30
"""Default ``.bin`` size limit of one output shard (16 GiB)."""
DEFAULT_MAX_BAD_FRACTION = 0.001
"""Default largest fraction of skipped records (0.1%) before a run fails: a clean corpus
has none or a handful, while a wrong ``--text-key``, a truncated file or a mixed-up input
skips far more."""


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
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    """With ``on_error="skip"``: fail the run when more than this fraction of the records
    (documents plus skipped records, over the whole output) was skipped. 0 allows none, 1
    any number. A failed run publishes no final shard and leaves its manifest unfinished."""
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


def validate_options(options: PretokenizeOptions) -> None:
    """Check the options that need no file system access.

    Raises:
        PretokenizeError: naming the option and the fix.
    """
    if options.on_error not in ON_ERROR_CHOICES:
        raise PretokenizeError(f"on_error={options.on_error!r}; choose one of {ON_ERROR_CHOICES}")
    if options.num_shards < 1 or not 0 <= options.shard_index < options.num_shards:
        raise PretokenizeError(
            f"shard_index={options.shard_index} is outside 0..num_shards-1 with "
            f"num_shards={options.num_shards}"
        )
    if not 0 <= options.max_bad_fraction <= 1:
        raise PretokenizeError(
            f"max_bad_fraction={options.max_bad_fraction}; use a fraction between 0 and 1 "
            "(0.001 allows one skipped record in a thousand)"
        )
    if options.workers < 1:
        raise PretokenizeError(f"workers={options.workers}; use at least 1")
    if options.max_shard_bytes < 1:
        raise PretokenizeError(f"max_shard_bytes={options.max_shard_bytes}; use a positive size")
    if options.output_prefix.endswith(("/", os.sep)):
        raise PretokenizeError(
            f"output prefix {options.output_prefix!r} names a directory; add the file name "
            "prefix, e.g. --output-prefix /data/tok/web_text_document"
        )
    if options.output_prefix.endswith((".bin", ".idx")):
        raise PretokenizeError(
            f"output prefix {options.output_prefix!r} ends with .bin/.idx; pass the prefix only"
        )
    if not options.inputs:
        raise PretokenizeError("no inputs given")
