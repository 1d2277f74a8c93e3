"""The random-number generators of one rank, saved with a checkpoint and restored on resume.

A resumed run continues the uninterrupted one bit for bit only if everything that draws
random numbers draws the same ones: dropout, data-loader worker seeds (torch draws a base
seed from its default generator each time a loader iterator starts, so every evaluation
moves it), and anything users add. Each rank writes its own file
(``rng/rank<NNNNN>.pt``) holding Python's, numpy's and torch's generators, the CUDA
generator of its device and megatron's tensor-parallel tracker (its ``model-parallel-rng``,
``expert-parallel-rng`` and ``data-parallel-rng`` streams).

The states are taken at a step boundary and put back at the same place in the resumed run:
after set-up (model building, data loaders) and before the first step, so what set-up draws
does not shift the streams. They only make sense for the same ranks doing the same work, so
they are restored only at the layout they were saved at; after a layout change the
generators start from ``trainer.seed`` as a fresh run's do.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ling_pretrain.core.io import atomic_open

RNG_DIR = "rng"
"""Directory of the per-rank files inside a checkpoint."""


def rank_file(root: str | Path, rank: int) -> Path:
    """The RNG-state file of ``rank`` in checkpoint directory ``root``."""
    return Path(root) / RNG_DIR / f"rank{rank:05d}.pt"


def _tracker() -> Any:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def capture() -> dict:
    """Every generator state of this process (plain containers and tensors only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": {
            name: (s.get_state() if isinstance(s, torch.Generator) else s).clone()
            for name, s in _tracker().get_states().items()
        },
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore(states: dict) -> None:
    """Put back the generator states :func:`capture` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    _tracker().set_states(dict(states["tracker"]))


def save(root: str | Path, rank: int, states: dict) -> Path:
    """Write ``states`` as this rank's file in checkpoint directory ``root``."""
    path = rank_file(root, rank)
    with atomic_open(path, "wb") as f:
        torch.save(states, f)
    return path


def load(root: str | Path, rank: int) -> dict | None:
    """This rank's saved states, or None when the checkpoint has none."""
    path = rank_file(root, rank)
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)
