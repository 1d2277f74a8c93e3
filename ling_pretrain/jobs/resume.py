"""Which checkpoint a start of a run resumes, and whether it may resume it as configured.

One rule for every way a run meets an existing checkpoint (its own save_dir after a requeue,
``checkpoint.load_dir``, a README command run twice in one directory):

* **Which checkpoint.** The newest complete checkpoint of the run's own ``save_dir`` or of
  ``checkpoint.load_dir``, by step; on a tie the run's own. ``load_dir`` is where a run
  starts, not where it stays: once the run has saved, its own checkpoints are newer, so a
  requeued job that still names ``load_dir`` goes on from its own progress.
* **The model.** A checkpoint resumes (or initialises, ``init_from``) only the model it was
  made with: a run whose ``model.*`` fields differ from the checkpoint's ``config.yaml`` is
  refused before any work, naming each field and both values.
* **The learning-rate schedule.** megatron's convention: ``checkpoint.override_scheduler``
  (megatron's ``override_opt_param_scheduler``) lets the config's values win,
  ``checkpoint.use_checkpoint_scheduler`` (``use_checkpoint_opt_param_scheduler``) the
  checkpoint's; with neither, a schedule that differs from the checkpoint's is refused (where
  megatron asserts). The checkpoint's side is the schedule it really followed (the
  scheduler's values in ``train_state.json``), so a run that kept the checkpoint's schedule
  once is asked again next time. Only differences that change a learning rate or weight
  decay count: under ``constant`` decay, extending ``trainer.max_steps`` is no change.
* **The layout** (TP/PP/EP/CP/DP, micro-batch size) may change freely; other changed fields
  (data, seed, FP8 recipe, optimizer kind, ...) are allowed and logged as a warning.
* A run already at ``trainer.max_steps`` does nothing and leaves its directory as it was.

:func:`check_resume` (called by ``validate``, no process group) decides all of this from
the YAML and JSON files; :func:`choose_checkpoint` (collective, at start-up) verifies the
chosen checkpoint's files, falls back to the newest intact one when it is damaged (or stops,
with ``checkpoint.on_damaged=error``), and checks the fallback the same way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ling_pretrain.checkpoint.dist import (
    CONFIG_FILE,
    DAMAGED_SUFFIX,
    LATEST,
    STATE_FILE,
    checkpoint_step,
    complete_checkpoints,
    damaged_message,
    read_train_state,
    resolve_checkpoint_dir,
    verify_checkpoint,
)
from ling_pretrain.config.schema import JobConfig
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.jobs.resolve import find_run_config
from ling_pretrain.optim.mcore import scheduler_kwargs

logger = logging.getLogger(__name__)

ON_DAMAGED = ("fallback", "error")
"""``checkpoint.on_damaged`` values."""
LAYOUT_FIELDS = ("parallel.", "trainer.micro_batch_size")
"""Changes that do not change what a checkpoint means (the checkpoint reshards)."""
UNCHECKED_FIELDS = (
    "run.",
    "logging.",
    "checkpoint.",
    "model.name",
    "trainer.max_minutes",
    "trainer.stop_margin_seconds",
    "trainer.eval_interval",
    "trainer.eval_iters",
    "trainer.recompute_granularity",
    "trainer.recompute_modules",
    "data.num_workers",
    "data.cache_dir",
)
"""How and where a run runs: free to change and not worth a warning."""
SCHEDULE_FIELDS = (
    "trainer.max_steps",
    "optimizer.lr",
    "optimizer.min_lr",
    "optimizer.lr_decay_style",
    "optimizer.lr_decay_steps",
    "optimizer.lr_warmup_steps",
    "optimizer.weight_decay",
)
"""The config fields of the learning-rate schedule (compared through the values they give
megatron's scheduler)."""
_SCHEDULER_VALUES = {
    "max_lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_steps": "optimizer.lr_warmup_steps",
    "lr_decay_style": "optimizer.lr_decay_style",
    "lr_decay_steps": "optimizer.lr_decay_steps",
    "start_wd": "optimizer.weight_decay",
}
"""megatron's scheduler values -> the config fields that set them."""
_MAX_LISTED = 6


def save_dir_of(cfg: Any) -> Path:
    """The run's own checkpoint directory: ``checkpoint.save_dir`` or
    ``<run.output_dir>/checkpoints``."""
    return Path(cfg.checkpoint.save_dir or os.path.join(cfg.run.output_dir, "checkpoints"))


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a start may resume."""

    path: Path
    step: int
    own: bool
    """In the run's own save_dir (else from ``checkpoint.load_dir``)."""

    @property
    def source(self) -> str:
        """Where it comes from, for messages."""
        return "the run's own save_dir" if self.own else "checkpoint.load_dir"


def load_dir_checkpoints(load_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints ``checkpoint.load_dir`` names, oldest first: itself when it is
    one (it holds ``train_state.json``), else the complete checkpoints in it."""
    p = Path(load_dir)
    if (p / STATE_FILE).is_file():
        return [p]
    return complete_checkpoints(p)


def candidates(cfg: Any) -> list[Candidate]:
    """The checkpoints a start of this run would resume, best first (see the module doc)."""
    ck = cfg.checkpoint
    found: dict[Path, Candidate] = {}
    if ck.load_dir:
        for p in load_dir_checkpoints(ck.load_dir):
            step = read_train_state(p).get("step", checkpoint_step(p))
            found[p.resolve()] = Candidate(p, int(step or 0), own=False)
    if ck.resume:
        for p in complete_checkpoints(save_dir_of(cfg)):
            found[p.resolve()] = Candidate(p, checkpoint_step(p), own=True)
    return sorted(found.values(), key=lambda c: (c.step, c.own), reverse=True)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def saved_config(ckpt: Path) -> dict | None:
    """The resolved config a checkpoint was made with (its ``config.yaml``, else the one
    beside it), with schema defaults for fields it predates; None when there is none or it
    cannot be read."""
    path = ckpt / CONFIG_FILE if (ckpt / CONFIG_FILE).is_file() else find_run_config(ckpt)
    if path is None:
        return None
    try:
        saved = OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException):
        return None
    try:
        saved = OmegaConf.merge(OmegaConf.structured(JobConfig), saved)
    except OmegaConfBaseException:
        pass  # a field this version no longer has: compare what there is
    try:
        container = OmegaConf.to_container(saved, resolve=True)
    except OmegaConfBaseException:
        return None
    return container if isinstance(container, dict) else None


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listed(lines: list[str]) -> str:
    more = len(lines) - _MAX_LISTED
    return "; ".join(lines[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _differences(saved: dict, now: dict, keep: Any) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    return [
        f"{key}: {_show(a.get(key))} in the checkpoint, {_show(b.get(key))} now"
        for key in sorted(set(a) | set(b))
        if keep(key) and a.get(key) != b.get(key)
    ]


def _model_problem(cand: Candidate, saved: dict, now: dict) -> str | None:
    diffs = _differences(saved, now, lambda k: k.startswith("model.") and k != "model.name")
    if not diffs:
        return None
    if cand.own:
        fix = (
            "Start a new run with another run.output_dir (to start from these weights in a "
            f"model with the same tensors, add checkpoint.init_from={cand.path} there)"
        )
    else:
        fix = (
            "Point checkpoint.load_dir at a checkpoint of this model, or start from these "
            f"weights in a model with the same tensors with checkpoint.init_from={cand.path} "
            "instead of checkpoint.load_dir"
        )
    return (
        f"{cand.path} ({cand.source}, step {cand.step}) holds another model than this run's: "
        f"{_listed(diffs)}. A checkpoint resumes only the model it was made with. {fix}."
    )


def _effective(params: dict) -> dict:
    """The scheduler values that change a learning rate or weight decay from now on (under
    ``constant`` decay, the decay length and ``min_lr`` never do)."""
    keys = ["max_lr", "lr_warmup_steps", "lr_decay_style", "start_wd"]
    if params.get("lr_decay_style") != "constant":
        keys += ["min_lr", "lr_decay_steps"]
    return {k: params.get(k) for k in keys}


def _checkpoint_schedule(cand: Candidate, saved: dict) -> dict | None:
    recorded = read_train_state(cand.path).get("scheduler")
    if isinstance(recorded, dict):
        return recorded
    try:
        return scheduler_kwargs(OmegaConf.create(saved))
    except (OmegaConfBaseException, KeyError, AttributeError, TypeError):
        return None


def schedule_changes(cfg: Any, cand: Candidate, saved: dict) -> list[str]:
    """How this config's learning-rate schedule differs from the one the checkpoint followed
    (empty when it does not), one line per value, naming the config fields."""
    theirs = _checkpoint_schedule(cand, saved)
    if theirs is None:
        return []
    ours = scheduler_kwargs(cfg)
    a, b = _effective(theirs), _effective(ours)
    lines = []
    for key, field in _SCHEDULER_VALUES.items():
        if key not in a or a[key] == b[key]:
            continue
        if key == "lr_decay_steps" and cfg.optimizer.lr_decay_steps is None:
            before = (saved.get("trainer") or {}).get("max_steps")
            field = (
                "decay steps (optimizer.lr_decay_steps is null, so trainer.max_steps="
                f"{cfg.trainer.max_steps} sets them; the checkpoint's run had "
                f"trainer.max_steps={before})"
            )
        lines.append(f"{field}: {_show(a[key])} in the checkpoint, {_show(b[key])} now")
    return lines


def _schedule_problem(cfg: Any, cand: Candidate, changes: list[str]) -> str:
    other = (
        "start a new run with another run.output_dir"
        if cand.own
        else "start from its weights only with checkpoint.init_from instead of checkpoint.load_dir"
    )
    return (
        f"the learning-rate schedule differs from the one {cand.path} ({cand.source}, step "
        f"{cand.step}) was trained with: {_listed(changes)}. Say which one continues: "
        "checkpoint.override_scheduler=true (this config's values win from step "
        f"{cand.step} on) or checkpoint.use_checkpoint_scheduler=true (the checkpoint's "
        f"values win and these are ignored); or {other}."
    )


def resume_problems(cfg: Any, cand: Candidate, saved: dict) -> list[str]:
    """Why this config may not resume checkpoint ``cand`` made with config ``saved``."""
    now = OmegaConf.to_container(cfg, resolve=True)
    problems = []
    model = _model_problem(cand, saved, now)
    if model:
        return [model]
    ck = cfg.checkpoint
    state = read_train_state(cand.path)
    chooses = ck.override_scheduler or ck.use_checkpoint_scheduler
    if not state.get("weights_only") and cfg.trainer.max_steps > cand.step and not chooses:
        changes = schedule_changes(cfg, cand, saved)
        if changes:
            problems.append(_schedule_problem(cfg, cand, changes))
    return problems


def _init_from_problems(cfg: Any) -> list[str]:
    path = cfg.checkpoint.init_from
    try:
        ckpt = resolve_checkpoint_dir(path)
    except FileNotFoundError as err:
        return [f"checkpoint.init_from={path}: {err}"]
    saved = saved_config(ckpt)
    if saved is None:
        return []
    diffs = _differences(
        saved,
        OmegaConf.to_container(cfg, resolve=True),
        lambda k: k.startswith("model.") and k != "model.name",
    )
    if not diffs:
        return []
    return [
        f"checkpoint.init_from={path} holds another model than this run's: {_listed(diffs)}. "
        "Weights load only into the model they were saved from: point checkpoint.init_from "
        "at a checkpoint of this model, or set these model fields as the checkpoint has them."
    ]


def check_resume(cfg: Any, errors: list[str]) -> None:
    """Append why this run cannot start from the checkpoint it would resume (or initialise
    from), found from the files alone, before any process group exists."""
    ck = cfg.checkpoint
    if ck.override_scheduler and ck.use_checkpoint_scheduler:
        errors.append(
            "checkpoint.override_scheduler (the config's schedule wins) and "
            "checkpoint.use_checkpoint_scheduler (the checkpoint's wins) exclude each other; "
            "set one."
        )
    if ck.on_damaged not in ON_DAMAGED:
        errors.append(
            f"checkpoint.on_damaged={ck.on_damaged!r} must be 'fallback' (resume from the newest "
            "intact checkpoint) or 'error' (stop)."
        )
    if ck.load_dir and not load_dir_checkpoints(ck.load_dir):
        errors.append(
            f"checkpoint.load_dir={ck.load_dir} holds no complete checkpoint (an iter_XXXXXXX "
            "directory with train_state.json, or a save_dir of them). Point it at a checkpoint "
            "written by this trainer; for weights only use checkpoint.init_from, for a Hugging "
            "Face checkpoint checkpoint.init_from_hf."
        )
    found = candidates(cfg)
    for cand in found:
        saved = saved_config(cand.path)
        if saved is not None:
            errors += resume_problems(cfg, cand, saved)
            return
    if not found and ck.init_from:
        errors += _init_from_problems(cfg)


def describe_resume(cfg: Any, cand: Candidate) -> list[str]:
    """Warnings for a resume that was accepted with changes: which schedule wins, and the
    other fields that differ from the checkpoint's config."""
    saved = saved_config(cand.path)
    if saved is None:
        return []
    lines = []
    changes = schedule_changes(cfg, cand, saved) if cfg.trainer.max_steps > cand.step else []
    if changes and cfg.checkpoint.override_scheduler:
        lines.append(
            "checkpoint.override_scheduler=true: this config's learning-rate schedule wins over "
            f"the checkpoint's from step {cand.step} on: {_listed(changes)}"
        )
    elif changes and cfg.checkpoint.use_checkpoint_scheduler:
        lines.append(
            "checkpoint.use_checkpoint_scheduler=true: the checkpoint's learning-rate schedule "
            f"wins; this config's differing values are ignored: {_listed(changes)}"
        )
    now = OmegaConf.to_container(cfg, resolve=True)

    def other(key: str) -> bool:
        told = ("model.", *SCHEDULE_FIELDS, *LAYOUT_FIELDS, *UNCHECKED_FIELDS)
        return not key.startswith(told)

    others = _differences(saved, now, other)
    if others:
        lines.append(f"resuming {cand.path} with changed settings: {_listed(others)}")
    return lines


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _set_aside(damaged: list[Candidate], resumed: Candidate) -> None:
    """Rank 0: rename the run's own damaged checkpoints ``iter_XXXXXXX.damaged`` (kept for
    inspection) and point ``latest`` at the one resumed."""
    for cand in damaged:
        if not cand.own:
            continue
        target = cand.path.with_name(cand.path.name + DAMAGED_SUFFIX)
        n = 1
        while target.exists():
            target = cand.path.with_name(f"{cand.path.name}{DAMAGED_SUFFIX}.{n}")
            n += 1
        os.replace(cand.path, target)
        logger.warning("renamed the damaged checkpoint %s to %s", cand.path, target.name)
    own = [c for c in damaged if c.own]
    if own:
        latest = own[0].path.parent / LATEST
        if resumed.own:
            atomic_write_text(latest, resumed.path.name)
        else:
            latest.unlink(missing_ok=True)


def choose_checkpoint(cfg: Any) -> Candidate | None:
    """The checkpoint this start resumes, verified; None for a start without one.

    Collective: every rank verifies a share of each candidate's files and all agree. A damaged
    candidate is logged with the file and what is wrong; then the next (older) one is tried,
    or, with ``checkpoint.on_damaged=error``, the run stops.

    Raises:
        ConfigError: a candidate is damaged and ``on_damaged=error``; every candidate is
            damaged; or the intact one fallen back to may not be resumed by this config.
    """
    damaged: list[Candidate] = []
    messages: list[str] = []
    for cand in candidates(cfg):
        started = time.perf_counter()
        problems = verify_checkpoint(cand.path)
        if not problems:
            if _rank0():
                logger.info("verified %s in %.2f s", cand.path, time.perf_counter() - started)
            if damaged:
                if _rank0():
                    logger.warning(
                        "resuming from %s (step %d), the newest intact checkpoint, instead of "
                        "the damaged %s",
                        cand.path,
                        cand.step,
                        ", ".join(c.path.name for c in damaged),
                    )
                    _set_aside(damaged, cand)
                if dist.is_initialized():
                    dist.barrier()
                saved = saved_config(cand.path)
                problems = resume_problems(cfg, cand, saved) if saved is not None else []
                if problems:
                    raise ConfigError("\n".join(problems))
            return cand
        message = damaged_message(cand.path, problems)
        if cfg.checkpoint.on_damaged == "error":
            raise ConfigError(
                f"{message}. checkpoint.on_damaged=error: stopping before anything was loaded. "
                "Restore the file or move the checkpoint away, or set "
                "checkpoint.on_damaged=fallback to resume from the newest intact checkpoint."
            )
        if _rank0():
            logger.error("%s; trying the previous checkpoint", message)
        damaged.append(cand)
        messages.append(message)
    if damaged:
        raise ConfigError(
            f"no intact checkpoint to resume ({'. '.join(messages)}). Nothing was loaded or "
            "changed. Restore a checkpoint, or start a new run with another run.output_dir."
        )
    return None
