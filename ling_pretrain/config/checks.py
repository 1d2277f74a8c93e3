"""Checks that need only the schemas: unknown keys, and the trainer and checkpoint fields."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from ling_pretrain.config.schema import JobConfig
from ling_pretrain.core.dtypes import PARAMS_DTYPES

RECOMPUTE = (None, "full", "selective")


def check_unknown_keys(cfg: Any, errors: list[str]) -> None:
    """Hydra's ``+group.key=value`` adds keys even to typed nodes; refuse ones no schema has."""

    def walk(node: Any, schema: type, path: str) -> None:
        hints = typing.get_type_hints(schema)
        for key in node.keys():
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1)
                hint = f" (did you mean {path}{close[0]}?)" if close else ""
                errors.append(f"{path}{key} is not a configuration field{hint}.")
            elif dataclasses.is_dataclass(hints[key]):
                walk(node[key], hints[key], f"{path}{key}.")

    walk(cfg, JobConfig, "")


def check_trainer(cfg: Any, errors: list[str]) -> None:
    """Append every problem of ``cfg.trainer``."""
    t = cfg.trainer
    if t.params_dtype not in PARAMS_DTYPES:
        errors.append(f"trainer.params_dtype={t.params_dtype!r} must be one of fp32, bf16, fp16.")
    if t.max_steps < 1:
        errors.append(f"trainer.max_steps={t.max_steps} must be >= 1.")
    if t.recompute_granularity not in RECOMPUTE:
        errors.append(
            f"trainer.recompute_granularity={t.recompute_granularity!r} must be null, 'full' or "
            "'selective'."
        )


def check_checkpoint(cfg: Any, errors: list[str]) -> None:
    """Append conflicts between the ways a run starts (resume, init_from, init_from_hf)."""
    ck = cfg.checkpoint
    if ck.init_from and ck.load_dir:
        errors.append(
            "checkpoint.init_from (weights only, step 0) and checkpoint.load_dir (full resume) "
            "exclude each other; set one."
        )
    if ck.init_from_hf and (ck.init_from or ck.load_dir):
        errors.append(
            "checkpoint.init_from_hf excludes checkpoint.init_from and checkpoint.load_dir; "
            "set one."
        )
