"""Checks of the ``data`` group that need no process group (the files exist, the fields agree)."""

from __future__ import annotations

import re
from typing import Any

from ling_pretrain.data.gpt import expand_prefix
from ling_pretrain.data.indexed import read_document_tokens

DATA_SOURCES = ("indexed", "mock", "builtin")
SPLITS = ("training", "validation", "test")


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
        shards = []
        for prefix in d.prefixes:
            try:
                shards += expand_prefix(prefix)
            except ValueError as err:
                errors.append(str(err))
        if shards and not errors:
            check_splits(cfg, shards, errors)
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


def split_bounds(split: str) -> list[tuple[float, float] | None]:
    """megatron-core's split matrix for ``data.split``: per split the (begin, end) fractions of
    every dataset's documents, None for a split of ratio 0. The same arithmetic as
    ``BlendedMegatronDatasetConfig`` (``parse_and_normalize_split`` and
    ``convert_split_vector_to_split_matrix``), without importing it."""
    ratios = [float(x) for x in re.findall(r"[.0-9]+", split)]
    ratios += [0.0] * (len(SPLITS) - len(ratios))
    total = sum(ratios)
    ratios = [r / total for r in ratios]
    bounds, start = [], 0.0
    for r in ratios:
        bounds.append((start, start + r) if r > 0 else None)
        start += r
    return bounds


def needed_splits(cfg: Any) -> list[bool]:
    """Which splits the run reads: training always, validation when it evaluates."""
    return [True, cfg.trainer.eval_interval > 0, False]


def check_splits(cfg: Any, shards: list[str], errors: list[str]) -> None:
    """Every split the run reads gets documents, and tokens, from every dataset.

    megatron-core cuts each dataset's documents by ``data.split``; a split that gets no
    tokens from a dataset makes its sample index loop forever, so it is refused here.
    """
    d = cfg.data
    if not re.fullmatch(r"\s*[.0-9]+(\s*[,/ ]\s*[.0-9]+){0,2}\s*", str(d.split)) or not any(
        float(x) for x in re.findall(r"[.0-9]+", str(d.split))
    ):
        errors.append(
            f"data.split={d.split!r} must be up to three non-negative ratios, not all 0 "
            "(train/validation/test), e.g. data.split=98/2/0."
        )
        return
    bounds = split_bounds(str(d.split))
    for i, needed in enumerate(needed_splits(cfg)):
        if not needed:
            continue
        if bounds[i] is None:
            how = "" if i == 0 else " while trainer.eval_interval > 0 evaluates on it"
            errors.append(
                f"data.split={d.split!r} gives the {SPLITS[i]} split no documents{how}. "
                + (
                    "Give it a ratio (e.g. data.split=98/2/0)"
                    + ("" if i == 0 else ", or set trainer.eval_interval=0")
                    + "."
                )
            )
            continue
        for shard in shards:
            try:
                tokens = read_document_tokens(shard)
            except (OSError, ValueError) as err:
                errors.append(f"data.prefixes: {err}")
                return
            n = len(tokens)
            begin, end = (int(round(x * n)) for x in bounds[i])
            if sum(tokens[begin:end]) == 0:
                have = end - begin
                fix = (
                    "Use a larger corpus, or give the split a larger ratio in data.split "
                    f"(it takes documents [{begin}, {end}) of {n} now)"
                )
                if i == 1:
                    fix += ", or set trainer.eval_interval=0 to train without evaluation"
                errors.append(
                    f"data.split={d.split!r} gives the {SPLITS[i]} split {have} of the {n} "
                    f"documents of {shard}"
                    + (" and they hold no tokens" if have else "")
                    + f": megatron cannot draw samples from it. {fix}."
                )
