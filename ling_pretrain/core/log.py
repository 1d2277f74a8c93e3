"""Logging set-up for entry points: full messages on rank 0, warnings only elsewhere."""

from __future__ import annotations

import logging
import os
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
    # megatron-core announces at import that optional GPU kernels are absent; that is
    # expected on the local (non-TE) path and is not actionable.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    for noisy in ("megatron.core", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar (a no-op when not ``enabled``, e.g. on ranks other than 0)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=1.0)
