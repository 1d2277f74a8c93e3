"""megatron distributed checkpoints (torch_dist), written atomically.

Layout of ``save_dir``::

    iter_0000100/          a complete checkpoint (model, optimizer, scheduler, train state)
    iter_0000100/train_state.json
    latest                 text file naming the newest complete checkpoint

A checkpoint is written into ``iter_XXXXXXX.partial``, renamed once every rank has finished,
and only then named in ``latest`` (itself replaced atomically), so a job killed mid-save leaves
the previous checkpoint as the latest and never a half-written one.

Two ways in, kept apart: *resume* restores everything (weights, optimizer, scheduler, step,
consumed samples); *init_from* loads weights only and starts at step 0 with a fresh optimizer.
Checkpoints are layout-independent: one saved at TP2 loads at PP2, EP2, ...
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ling_pretrain.core.io import atomic_write_json, atomic_write_text
from ling_pretrain.optim import checkpointing as optimizer_state

logger = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Progress that a resume must restore besides tensors."""

    step: int = 0
    """Optimizer steps taken."""
    consumed_samples: int = 0
    """Training samples consumed (global)."""
    tokens: int = 0
    """Training tokens consumed (global)."""
    weights_only: bool = False
    """The checkpoint holds model weights only (a seed checkpoint): nothing else to resume."""
    bad_steps: dict = field(default_factory=dict)
    """The bad-step policy's statistics (``train.bad_steps``), so a resumed run decides alike."""


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def find_latest(save_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory in ``save_dir``, or None."""
    root = Path(save_dir)
    marker = root / LATEST
    if marker.is_file():
        candidate = root / marker.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def unwrap(chunk: Any) -> Any:
    """The model chunk inside its wrappers (DDP, ...): checkpoint keys are the model's own."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model: list) -> dict:
    """Sharded state dict of all model chunks (keys ``model`` or ``model0..N``).

    With MTP on a later pipeline stage than the embedding, megatron keeps a tied copy of the
    embedding there; tying it in the checkpoint needs the data-parallel group.
    """
    from megatron.core import parallel_state as ps

    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    return {
        _model_key(i, len(model)): unwrap(m).sharded_state_dict(metadata=metadata)
        for i, m in enumerate(model)
    }


def save_checkpoint(
    save_dir: str,
    state: TrainState,
    model: list,
    optimizer: Any = None,
    scheduler: Any = None,
    keep_last: int = 0,
) -> Path:
    """Save everything needed to resume, atomically. Collective: every rank calls it.

    Without an optimizer only the weights are saved (a seed checkpoint).
    """
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    final = root / iter_dir_name(state.step)
    partial = root / (final.name + ".partial")
    start = time.perf_counter()
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    dist.barrier()
    sharded = model_sharded_state_dict(model)
    with optimizer_state.saving(optimizer):
        if optimizer is not None:
            sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, sharded)
            sharded["scheduler"] = scheduler.state_dict()
        dist_checkpointing.save(sharded, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        record = asdict(state) | {"weights_only": optimizer is None}
        atomic_write_json(partial / STATE_FILE, record)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / LATEST, final.name)
        if keep_last > 0:
            done = sorted(
                p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".partial")
            )
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - start)
    dist.barrier()
    return final


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a megatron distributed checkpoint (no metadata.json). Give a "
            "directory written by this trainer (iter_XXXXXXX) or its parent save_dir; for a "
            "Hugging Face checkpoint convert it first."
        )


def resolve_checkpoint_dir(path: str) -> Path:
    """Accept a checkpoint directory or a save_dir containing ``latest``."""
    p = Path(path)
    if (p / LATEST).is_file() or (not (p / "metadata.json").is_file() and p.is_dir()):
        latest = find_latest(p)
        if latest is not None:
            p = latest
    _check_checkpoint_dir(p)
    return p


def load_checkpoint(
    path: str | os.PathLike,
    model: list,
    optimizer: Any = None,
    scheduler: Any = None,
) -> TrainState:
    """Load a checkpoint into ``model`` (and optimizer/scheduler when given: a resume).

    With ``optimizer=None``, or from a weights-only checkpoint, only the weights are loaded
    and a fresh :class:`TrainState` is returned (``init_from``). Collective: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(str(path))
    saved = json.loads((ckpt / STATE_FILE).read_text()) if (ckpt / STATE_FILE).is_file() else {}
    if saved.get("weights_only"):
        optimizer = scheduler = None
    sharded = model_sharded_state_dict(model)
    with optimizer_state.loading(optimizer):
        if optimizer is not None:
            sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, sharded, ckpt)
        state_dict = dist_checkpointing.load(sharded, str(ckpt))
        for i, m in enumerate(model):
            unwrap(m).load_state_dict(state_dict[_model_key(i, len(model))], strict=True)
        if optimizer is None:
            return TrainState()
        import torch

        with torch.no_grad():  # copies into fp32 master weights, which are leaves requiring grad
            optimizer_state.load_state_dict(optimizer, state_dict["optimizer"])
    if scheduler is not None and "scheduler" in state_dict:
        scheduler.load_state_dict(state_dict["scheduler"])
    return TrainState(**saved)
