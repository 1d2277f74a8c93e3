"""Checks of the ``data`` group that need no process group (the files exist, the fields agree)."""

from __future__ import annotations

from typing import Any

from ling_pretrain.data.gpt import expand_prefix

DATA_SOURCES = ("indexed", "mock", "builtin")


def check_data(cfg: Any, errors: list[str]) -> None:
    """Append every problem of ``cfg.data``."""
    d = cfg.data
    if d.source not in DATA_SOURCES:
        errors.append(f"data.source={d.source!r} must be one of {', '.join(DATA_SOURCES)}.")
    if d.source == "indexed":
        if not d.prefixes:
            errors.append(
                "data.source=indexed needs data.prefixes=[...] (outputs of "
                "data_tools/pretokenize.py), or use data=builtin / data=mock."
            )
        for prefix in d.prefixes:
            try:
                expand_prefix(prefix)
            except ValueError as err:
                errors.append(str(err))
        if d.weights is not None and len(d.weights) != len(d.prefixes):
            errors.append(
                f"data.weights has {len(d.weights)} entries but data.prefixes has "
                f"{len(d.prefixes)}; give one weight per prefix or null."
            )
        if d.eod_token_id is None and d.tokenizer is None:
            errors.append(
                "data.source=indexed needs data.eod_token_id or data.tokenizer (an HF tokenizer "
                "directory) to know the end-of-document token."
            )
    if d.seq_length < 2:
        errors.append(f"data.seq_length={d.seq_length} must be >= 2.")
