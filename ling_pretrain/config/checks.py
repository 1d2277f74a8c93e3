"""Checks that need only the schemas: unknown keys, and the trainer and checkpoint fields."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

from ling_pretrain.config.schema import JobConfig
from ling_pretrain.core.dtypes import PARAMS_DTYPES

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The shipped Hydra configuration directory."""

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
        errors.append(
            f"trainer.max_steps={t.max_steps} must be >= 1; set trainer.max_steps=<steps>."
        )
    if t.recompute_granularity not in RECOMPUTE:
        errors.append(
            f"trainer.recompute_granularity={t.recompute_granularity!r} must be null, 'full' or "
            "'selective'."
        )
    if t.max_minutes is not None and not t.max_minutes > 0:
        errors.append(f"trainer.max_minutes={t.max_minutes} must be > 0, or null for no budget.")
    if not t.stop_margin_seconds >= 0:
        errors.append(f"trainer.stop_margin_seconds={t.stop_margin_seconds} must be >= 0.")
    check_bad_steps(t, errors)


def check_bad_steps(t: Any, errors: list[str]) -> None:
    """Append every problem of the bad-step fields of ``trainer``."""
    if t.loss_spike_sigma is not None and not t.loss_spike_sigma > 0:
        errors.append(
            f"trainer.loss_spike_sigma={t.loss_spike_sigma} must be > 0 (standard deviations), "
            "or null to turn spike detection off."
        )
    if t.loss_spike_window < 2:
        errors.append(
            f"trainer.loss_spike_window={t.loss_spike_window} must be >= 2 (a standard "
            "deviation needs two losses)."
        )
    if not 2 <= t.loss_spike_warmup <= t.loss_spike_window:
        errors.append(
            f"trainer.loss_spike_warmup={t.loss_spike_warmup} must be between 2 and "
            f"trainer.loss_spike_window={t.loss_spike_window}."
        )
    if t.max_consecutive_bad_steps < 1:
        errors.append(
            f"trainer.max_consecutive_bad_steps={t.max_consecutive_bad_steps} must be >= 1."
        )
    for name in ("inject_nan_grad_steps", "inject_loss_spike_steps"):
        bad = [s for s in getattr(t, name) if s < 1]
        if bad:
            errors.append(
                f"trainer.{name}={list(getattr(t, name))}: steps are numbered from 1, so {bad} "
                "never come; leave the list empty in real runs."
            )


def check_logging(cfg: Any, errors: list[str]) -> None:
    """Append every problem of ``cfg.logging``."""
    lg = cfg.logging
    if lg.log_interval < 1:
        errors.append(f"logging.log_interval={lg.log_interval} must be >= 1 (steps per record).")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        errors.append(
            f"logging.peak_tflops={lg.peak_tflops} must be > 0 (one device's dense BF16 peak in "
            "TFLOP/s), or null to take it from the table of known GPUs."
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


def presets(group: str) -> list[str]:
    """The presets of a config group (``conf/<group>/*.yaml``), schema entries left out."""
    return sorted(
        p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.endswith("_schema")
    )


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Problems of command-line overrides, found before Hydra composes anything: a key no
    schema has (with the closest real one), or a preset a group does not have (with the
    valid ones). Hydra's own messages for these point at ``+key=...``, which only adds a key
    the run then refuses."""
    problems: list[str] = []
    for override in overrides:
        if "=" not in override or override.startswith(("hydra.", "~", "+hydra.")):
            continue
        key, value = override.split("=", 1)
        key = key.lstrip("+")
        if "." not in key:
            if (CONF_DIR / key).is_dir():
                options = presets(key)
                if value not in options and value.lower() != "null":
                    problems.append(
                        f"{key}={value}: conf/{key}/ has no preset {value!r}"
                        f"{_suggest(value, options)}; choose one of {', '.join(options)}."
                    )
            else:
                groups = sorted(typing.get_type_hints(JobConfig))
                problems.append(
                    f"{override}: {key!r} is neither a config group nor a field"
                    f"{_suggest(key, groups)}; groups: {', '.join(groups)}."
                )
            continue
        schema: Any = JobConfig
        walked = []
        for part in key.split("."):
            hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
            if part not in hints:
                path = ".".join(walked)
                options = [f"{path}.{h}" if path else h for h in hints]
                where = f"{path}." if path else ""
                problems.append(
                    f"{override}: {where}{part} is not a configuration field"
                    f"{_suggest('.'.join([*walked, part]), options)}; see docs/configuration.md."
                )
                break
            walked.append(part)
            schema = hints[part]
    return problems


def check_run(cfg: Any, errors: list[str]) -> None:
    """Append the problems of ``cfg.run``: an output directory the job cannot create or
    write, a process-group timeout that is not positive."""
    if not cfg.run.distributed_timeout_minutes > 0:
        errors.append(
            f"run.distributed_timeout_minutes={cfg.run.distributed_timeout_minutes} must be > 0."
        )
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        errors.append(
            f"run.output_dir={out} is a file; the run needs a directory for its config, metrics "
            "and checkpoints. Set run.output_dir to a directory (new or a previous run of it)."
        )
        return
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        errors.append(
            f"run.output_dir={out} cannot be written ({parent} is not writable by this user); "
            "set run.output_dir to a directory you can write."
        )
