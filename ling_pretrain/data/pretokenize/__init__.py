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
  megatron-core and torch out of the start-up path.

Crash safety: a shard is written under temporary names, fsynced, and renamed ``.bin`` first
and ``.idx`` last, so an interrupted run never leaves a valid-looking index over partial data.
After every finished shard the manifest records it together with a fingerprint of the inputs,
the tokenizer and the options, and the position in the input where the next shard starts; a
rerun with the same fingerprint keeps the finished shards and continues from there.

The modules, in import order (each imports only those above it, and the reader
:mod:`ling_pretrain.data.indexed`):

* :mod:`.options`: the options of a run, their checks, and :class:`PretokenizeError`;
* :mod:`.inputs`: finding and classifying input files, cutting them into units of work;
* :mod:`.readers`: reading units into batches of raw records (JSONL, Parquet, Arrow, text);
* :mod:`.encode`: the tokenizer's facts, the per-batch encoder and the worker pool;
* :mod:`.writer`: one shard's ``.bin`` and ``.idx`` files;
* :mod:`.manifest`: the finished shards, resume positions and the fingerprint;
* :mod:`.run`: one run from options to summary, with progress.
"""

from ling_pretrain.data.indexed import collect_prefixes, index_size
from ling_pretrain.data.pretokenize.encode import (
    SKIP_REASONS,
    TokenizerInfo,
    choose_dtype,
    load_tokenizer_info,
)
from ling_pretrain.data.pretokenize.inputs import InputFile, discover_inputs
from ling_pretrain.data.pretokenize.options import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_TEXT_SUFFIXES,
    DTYPE_CHOICES,
    ON_ERROR_CHOICES,
    PretokenizeError,
    PretokenizeOptions,
)
from ling_pretrain.data.pretokenize.run import PretokenizeSummary, pretokenize
from ling_pretrain.data.pretokenize.writer import index_bytes

__all__ = [
    "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_MAX_SHARD_BYTES",
    "DEFAULT_TEXT_SUFFIXES",
    "DTYPE_CHOICES",
    "ON_ERROR_CHOICES",
    "SKIP_REASONS",
    "InputFile",
    "PretokenizeError",
    "PretokenizeOptions",
    "PretokenizeSummary",
    "TokenizerInfo",
    "choose_dtype",
    "collect_prefixes",
    "discover_inputs",
    "index_bytes",
    "index_size",
    "load_tokenizer_info",
    "pretokenize",
]
