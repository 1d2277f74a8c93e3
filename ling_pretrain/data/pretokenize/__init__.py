"""Pretokenize text corpora into megatron-core indexed datasets (``.bin`` / ``.idx``).

The public API; :mod:`.run` holds the implementation.
"""

from ling_pretrain.data.indexed import collect_prefixes, index_size
from ling_pretrain.data.pretokenize.run import (
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_TEXT_SUFFIXES,
    DTYPE_CHOICES,
    ON_ERROR_CHOICES,
    SKIP_REASONS,
    InputFile,
    PretokenizeError,
    PretokenizeOptions,
    PretokenizeSummary,
    TokenizerInfo,
    choose_dtype,
    discover_inputs,
    index_bytes,
    load_tokenizer_info,
    pretokenize,
)

__all__ = [
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
