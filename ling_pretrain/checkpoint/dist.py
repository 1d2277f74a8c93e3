"""megatron distributed checkpoints (torch_dist), written atomically and verified before use.

Layout of ``save_dir``::

    iter_0000100/                  a complete checkpoint
    iter_0000100/__0_0.distcp ...  model, optimizer and scheduler (megatron's torch_dist files)
    iter_0000100/train_state.json  step, consumed samples, the scheduler's values, the layout
    iter_0000100/config.yaml       the resolved config the checkpoint was made with
    iter_0000100/rng/rank00000.pt  each rank's random-number generators
    iter_0000100/manifest.json     every file above with its size and checksum (written last)
    latest                         text file naming the newest complete checkpoint

A checkpoint is written into ``iter_XXXXXXX.partial``; once every rank has finished writing,
rank 0 records the files in the manifest (:mod:`ling_pretrain.checkpoint.manifest`), renames
the directory and only then names it in ``latest`` (itself replaced atomically). A job killed
mid-save leaves the previous checkpoint as the newest complete one, never a half-written one.
Before a checkpoint is loaded its files are checked against the manifest (each rank checks a
share), so a damaged one is named with the file and what is wrong instead of failing inside
torch's reader or loading garbage.

With ``checkpoint.async_save`` the tensors are written in the background by megatron-core's
async torch_dist save (``dist_checkpointing.save(..., async_sharded_save=True)`` scheduled on
its ``AsyncCallsQueue``) while training goes on; the manifest, the rename and ``latest``
come only when the write has finished on every rank (:meth:`Checkpointer.poll` at each step
boundary, :meth:`Checkpointer.wait` before a stop or the end). megatron's temporal caller
forks a writer process per save. That fork is what makes it safe on CPU too: there the
"copy to host" megatron does for GPU tensors is a no-op, and the forked writer keeps a
copy-on-write snapshot of the weights while the trainer updates its own. megatron's
persistent (spawn) caller would share the live tensors instead, so it is not used.

Two ways in, kept apart: *resume* restores everything (weights, optimizer, scheduler, step,
consumed samples, RNG); *init_from* loads weights only and starts at step 0 with a fresh
optimizer. Checkpoints are layout-independent: one saved at TP2 loads at PP2, EP2, ...
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from ling_pretrain.checkpoint import manifest, rng
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_json, atomic_write_text, fsync_dir
from ling_pretrain.core.layout import Layout
from ling_pretrain.optim import checkpointing as optimizer_state

logger = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
"""The resolved config of the run that saved the checkpoint, inside the checkpoint."""
FORMAT = 2
"""``train_state.json``'s ``format``: 2 for checkpoints with a manifest (older ones have none)."""
DAMAGED_SUFFIX = ".damaged"
"""A damaged checkpoint of the run's own save_dir is renamed to ``iter_XXXXXXX.damaged`` once
the run has resumed from an intact one, and kept for inspection (nothing deletes it)."""
_ITER = re.compile(r"iter_(\d{7,})")
_DESCRIBED = ".described-rank"
"""Prefix of the per-rank lists of written files (with their checksums), merged into the
manifest and removed before the rename."""


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


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint directory's name (``iter_0000100`` -> 100), else None."""
    match = _ITER.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``save_dir``, oldest first: ``iter_XXXXXXX`` directories
    (renamed into place once every rank had finished) holding ``train_state.json``."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if checkpoint_step(p) is not None and p.is_dir() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def find_latest(save_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory in ``save_dir``, or None."""
    found = complete_checkpoints(save_dir)
    return found[-1] if found else None


def read_train_state(ckpt: str | os.PathLike) -> dict:
    """``train_state.json`` of a checkpoint ({} when it has none or it cannot be read)."""
    try:
        data = json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def layout_record(layout: Layout | None) -> dict | None:
    """The parts of a layout that decide which rank holds what (RNG states are per rank)."""
    if layout is None:
        return None
    return {k: v for k, v in asdict(layout).items() if k != "num_microbatches"}


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


def _save_kwargs() -> dict:
    """megatron-core 0.19 defaults the async implementation to nvidia-resiliency-ext's; ask for
    megatron-core's own, which both ends of the supported range have."""
    from megatron.core import dist_checkpointing

    params = inspect.signature(dist_checkpointing.save).parameters
    return {"async_strategy": "mcore"} if "async_strategy" in params else {}


def _write_and_describe(
    write: Any, described: str, checksums: bool, rank: int, buckets: list, results: Any
) -> None:
    """megatron's write function for one rank, then the list of the files it wrote (with
    their checksums, while they are in the page cache). Runs in megatron's writer process
    for async saves. ``buckets`` are megatron's write buckets (path first)."""
    started = time.perf_counter()
    write(rank, buckets, results)
    written = time.perf_counter()
    try:
        root = Path(described).parent
        files = manifest.describe([bucket[0] for bucket in buckets], root, checksums)
        record = {
            "files": files,
            "write_seconds": written - started,
            "checksum_seconds": time.perf_counter() - written,
        }
        atomic_write_json(described, record)
    except Exception:  # noqa: BLE001 - rank 0 describes every file no rank described
        pass


def prune(save_dir: str | os.PathLike, newest: Path, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints older than ``newest`` beyond the ``keep_last`` newest
    (``newest`` counts as one); returns what was deleted.

    Only ever called with the checkpoint just written, which is the newest intact one by
    construction: checkpoints with a higher step (left by a run that fell back from a damaged
    one) and ``newest`` itself are never deleted.
    """
    if keep_last <= 0:
        return []
    step = checkpoint_step(newest)
    older = [p for p in complete_checkpoints(save_dir) if checkpoint_step(p) < step]
    doomed = older[: max(len(older) - (keep_last - 1), 0)]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


@dataclass
class _Pending:
    """A save whose tensors are being written; complete after :meth:`Checkpointer._complete`."""

    final: Path
    partial: Path
    started: float
    blocking_seconds: float = 0.0
    """Until training went on (a background save) or the save was complete."""
    write_seconds: float = 0.0
    """Writing and checksums on the slowest rank, and the manifest (rank 0 only)."""


class Checkpointer:
    """Saves checkpoints of one run into ``save_dir``, synchronously or in the background.

    Every method that saves or completes a save is collective: every rank calls it at the
    same point.

    Args:
        save_dir: where the ``iter_XXXXXXX`` directories go.
        keep_last: keep only this many newest checkpoints (0: all); see :func:`prune`.
        checksums: record each file's xxh3-64 checksum in the manifest (sizes always).
        async_save: write tensors in the background while training goes on.
        config: the job config, stored in each checkpoint as ``config.yaml``.
        run_config: a file to rewrite with the same config whenever a checkpoint completes
            (the run directory's ``config.yaml``, which describes its checkpoints).
        layout: the parallel layout, recorded so RNG states are restored only at the same one.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        *,
        keep_last: int = 0,
        checksums: bool = True,
        async_save: bool = False,
        config: Any = None,
        run_config: str | os.PathLike | None = None,
        layout: Layout | None = None,
    ):
        self.root = Path(save_dir)
        self.keep_last = keep_last
        self.checksums = checksums
        self.async_save = async_save
        self.config_text = OmegaConf.to_yaml(config, resolve=True) if config is not None else None
        self.run_config = Path(run_config) if run_config is not None else None
        self.layout = layout_record(layout)
        self.slowest_seconds = 0.0
        """The longest save so far, from its start until it was complete on every rank."""
        self._pending: _Pending | None = None
        self._queue = None

    @property
    def pending(self) -> bool:
        """Whether a background save has not completed yet."""
        return self._pending is not None

    def save(
        self,
        state: TrainState,
        model: list,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        wait: bool = True,
    ) -> Path:
        """Save everything needed to resume (without an optimizer: the weights only, a seed
        checkpoint). Returns the checkpoint's final path.

        With ``async_save`` and ``wait=False`` the tensors are written in the background and
        the checkpoint is complete only after a later :meth:`poll` or :meth:`wait`; a save
        still in progress is completed first.
        """
        from megatron.core import dist_checkpointing

        self.wait()
        rank = dist.get_rank()
        final = self.root / iter_dir_name(state.step)
        partial = self.root / (final.name + ".partial")
        started = time.perf_counter()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir()
        dist.barrier()
        sharded = model_sharded_state_dict(model)
        described = partial / f"{_DESCRIBED}{rank:05d}.json"
        with optimizer_state.saving(optimizer):
            if optimizer is not None:
                sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, sharded)
                sharded["scheduler"] = scheduler.state_dict()
            request = dist_checkpointing.save(
                sharded, str(partial), async_sharded_save=True, **_save_kwargs()
            )
            if request.async_fn is not None:
                write = functools.partial(
                    _write_and_describe, request.async_fn, str(described), self.checksums
                )
                request = request._replace(async_fn=write)
            self._write_small_files(partial, state, optimizer, scheduler)
            pending = _Pending(final, partial, started)
            request.add_finalize_fn(functools.partial(self._complete, pending))
            if self.async_save and not wait:
                # Inside the optimizer context: the writer is forked now, while the state
                # dict it writes (8-bit Adam shows fp32 moments here) is in place.
                self._async_queue().schedule_async_request(request)
                self._pending = pending
            else:
                request.execute_sync()
        pending.blocking_seconds = time.perf_counter() - started
        if self._pending is not None and rank == 0:
            logger.info(
                "saving checkpoint %s in the background (training goes on after %.2f s)",
                final,
                pending.blocking_seconds,
            )
        return final

    def _write_small_files(
        self, partial: Path, state: TrainState, optimizer: Any, scheduler: Any
    ) -> None:
        """Each rank's RNG states; rank 0's train state and config (all before the manifest)."""
        rank = dist.get_rank()
        if optimizer is not None:
            rng.save(partial, rank, rng.capture())
        if rank != 0:
            return
        record = asdict(state) | {"weights_only": optimizer is None, "format": FORMAT}
        if scheduler is not None:
            record["scheduler"] = scheduler.state_dict()
        if self.layout is not None:
            record["layout"] = self.layout
        atomic_write_json(partial / STATE_FILE, record)
        if self.config_text is not None:
            atomic_write_text(partial / CONFIG_FILE, self.config_text)

    def _async_queue(self) -> Any:
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
        return self._queue

    def _complete(self, pending: _Pending) -> None:
        """Collective, once every rank has written its files: rank 0 writes the manifest,
        renames the directory into place, names it in ``latest`` and prunes."""
        if dist.get_rank() == 0:
            self._publish(pending)
        dist.barrier()
        if self._pending is pending:
            # What the save would cost if it had been synchronous (a stop saves so), not the
            # wall time during which training went on.
            cost = pending.blocking_seconds + pending.write_seconds
            self._pending = None
        else:
            cost = time.perf_counter() - pending.started
        self.slowest_seconds = max(self.slowest_seconds, cost)

    def _publish(self, pending: _Pending) -> None:
        partial, final = pending.partial, pending.final
        entries: dict[str, dict] = {}
        write_seconds = checksum_seconds = 0.0
        for described in sorted(partial.glob(f"{_DESCRIBED}*.json")):
            try:
                record = json.loads(described.read_text())
                entries.update(record["files"])
                write_seconds = max(write_seconds, record["write_seconds"])
                checksum_seconds = max(checksum_seconds, record["checksum_seconds"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # described again below
            described.unlink(missing_ok=True)
        files = manifest.files_in(partial)
        found = {p.relative_to(partial).as_posix() for p in files}
        entries = {name: e for name, e in entries.items() if name in found}
        started = time.perf_counter()
        rest = [p for p in files if p.relative_to(partial).as_posix() not in entries]
        entries.update(manifest.describe(rest, partial, self.checksums))
        checksum_seconds += time.perf_counter() - started
        manifest.write_manifest(partial, entries, self.checksums)
        pending.write_seconds = write_seconds + checksum_seconds
        fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(self.root / LATEST, final.name, sync_dir=True)
        if self.run_config is not None and self.config_text is not None:
            atomic_write_text(self.run_config, self.config_text)
        pruned = prune(self.root, final, self.keep_last)
        size = sum(e["size"] for e in entries.values())
        how = "in the background " if self._pending is pending else ""
        logger.info(
            "saved checkpoint %s %sin %.2f s (%d files, %.1f MB; writing %.3f s, checksums "
            "%.3f s%s)",
            final,
            how,
            time.perf_counter() - pending.started,
            len(entries),
            size / 1e6,
            write_seconds,
            checksum_seconds,
            "" if self.checksums else ", off",
        )
        if pruned:
            logger.info(
                "keep_last=%d: removed %s", self.keep_last, ", ".join(p.name for p in pruned)
            )

    def poll(self) -> None:
        """Complete a background save that has finished on every rank (collective while one
        is pending; nothing to do otherwise)."""
        if self._pending is not None:
            self._async_queue().maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Wait for a background save and complete it (collective while one is pending)."""
        if self._pending is not None:
            self._async_queue().maybe_finalize_async_calls(blocking=True)


def save_checkpoint(
    save_dir: str,
    state: TrainState,
    model: list,
    optimizer: Any = None,
    scheduler: Any = None,
    keep_last: int = 0,
    *,
    config: Any = None,
) -> Path:
    """Save everything needed to resume, atomically, and return when it is complete.
    Collective: every rank calls it. Without an optimizer only the weights are saved (a seed
    checkpoint)."""
    saver = Checkpointer(save_dir, keep_last=keep_last, config=config)
    return saver.save(state, model, optimizer, scheduler)


def _dedupe(problems: list[str]) -> list[str]:
    """One problem per file: what the manifest says (missing, truncated, ...) wins."""
    kept: dict[str, str] = {}
    for problem in sorted(problems, key=lambda p: "unreadable" in p):
        kept.setdefault(problem.split(":", 1)[0], problem)
    return sorted(kept.values())


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with checkpoint directory ``path`` (empty when intact).

    Collective when a process group exists: each rank checks a share of the files and every
    rank gets the same answer. A checkpoint saved before checkpoints had manifests is not
    checked (a warning says so).
    """
    ckpt = Path(path)
    if not (ckpt / manifest.MANIFEST).exists() and (ckpt / STATE_FILE).is_file():
        if "format" not in read_train_state(ckpt):
            if not dist.is_initialized() or dist.get_rank() == 0:
                logger.warning(
                    "%s has no %s (saved before checkpoints recorded their files): loading it "
                    "unverified",
                    ckpt,
                    manifest.MANIFEST,
                )
            return []
    share = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = manifest.verify(ckpt, share)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    return _dedupe(problems)


def damaged_message(ckpt: Path, problems: list[str], limit: int = 6) -> str:
    """``<ckpt> is damaged: <file>: <what>; ...``."""
    shown = "; ".join(problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"checkpoint {ckpt} is damaged: {shown}{more}"


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
    *,
    verify: bool = True,
) -> TrainState:
    """Load a checkpoint into ``model`` (and optimizer/scheduler when given: a resume).

    With ``optimizer=None``, or from a weights-only checkpoint, only the weights are loaded
    and a fresh :class:`TrainState` is returned (``init_from``). The checkpoint is verified
    first unless ``verify`` is False (the caller verified it). Collective: every rank calls it.

    Raises:
        ConfigError: the checkpoint is damaged (naming each file and what is wrong).
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(str(path))
    started = time.perf_counter()
    if verify:
        problems = verify_checkpoint(ckpt)
        if problems:
            raise ConfigError(damaged_message(ckpt, problems) + ". Nothing was loaded.")
    saved = read_train_state(ckpt)
    if saved.get("weights_only"):
        optimizer = scheduler = None
    sharded = model_sharded_state_dict(model)
    with optimizer_state.loading(optimizer):
        if optimizer is not None:
            sharded["optimizer"] = optimizer_state.sharded_state_dict(optimizer, sharded, ckpt)
        state_dict = dist_checkpointing.load(sharded, str(ckpt))
        for i, m in enumerate(model):
            unwrap(m).load_state_dict(state_dict[_model_key(i, len(model))], strict=True)
        if optimizer is not None:
            import torch

            with torch.no_grad():  # copies into fp32 master weights, which are leaves
                optimizer_state.load_state_dict(optimizer, state_dict["optimizer"])
    if scheduler is not None and "scheduler" in state_dict:
        scheduler.load_state_dict(state_dict["scheduler"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("loaded checkpoint %s in %.2f s", ckpt, time.perf_counter() - started)
    if optimizer is None:
        return TrainState()
    names = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in saved.items() if k in names})
