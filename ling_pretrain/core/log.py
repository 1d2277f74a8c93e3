"""Logging set-up for entry points: full messages on rank 0, warnings only elsewhere."""

from __future__ import annotations

import logging
import os
import re
import warnings


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process.

    Rank 0 logs at ``level``; other ranks log warnings and errors only, prefixed with their
    rank, so a multi-process console stays readable.
    """
    rank = int(os.environ.get("RANK", "0"))
    prefix = "" if rank == 0 else f"[rank{rank}] "
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    quiet_upstream_notices()


UPSTREAM_NOTICES = (
    # megatron-core at import: optional GPU kernels are absent (expected on the local path).
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    # megatron-core 0.16's TransformerConfig default, not a setting of ours.
    "full scope is deprecated",
    # torch about the collectives megatron-core calls.
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
)
"""Warnings of the libraries underneath that say nothing a user can act on."""


def ignore_upstream_warnings() -> None:
    """Hide :data:`UPSTREAM_NOTICES` in this process (the package does it at import, before
    megatron-core is imported and warns)."""
    for message in UPSTREAM_NOTICES:
        warnings.filterwarnings("ignore", message=".*" + re.escape(message))


def quiet_upstream_notices() -> None:
    """Hide :data:`UPSTREAM_NOTICES` in this process and in the processes it starts (data
    workers, the checkpoint writer), and megatron-core's informational warnings (its rerun
    state machine announcing its default mode)."""
    ignore_upstream_warnings()
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    ours = [f"ignore:{m}" for m in UPSTREAM_NOTICES]
    os.environ["PYTHONWARNINGS"] = ",".join(dict.fromkeys([*inherited, *ours]))
    for noisy in ("megatron.core", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("megatron.core.rerun_state_machine").setLevel(logging.ERROR)


def add_log_file(path: str | os.PathLike) -> None:
    """Also write this process's log records to ``path`` (appended, e.g. across resumes)."""
    handler = logging.FileHandler(path)
    root = logging.getLogger()
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar (a no-op when not ``enabled``, e.g. on ranks other than 0)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=1.0)
