"""How an optimizer's state goes into and comes out of a megatron distributed checkpoint.

The checkpoint code (:mod:`ling_pretrain.checkpoint.dist`) calls three things and knows
nothing else about optimizers: :func:`sharding_metadata` (how megatron lays the state out),
:func:`saving` around a save and :func:`loading` around a load. What happens inside them:

* **8-bit Adam** (:class:`~ling_pretrain.optim.adam8bit.Adam8bit`) shows its moments as fp32
  under torch AdamW's names while megatron reads or writes the state, so checkpoints hold
  plain Adam's format. After a save the 8-bit state is put back untouched; after a load the
  fp32 moments written by the load are encoded (encoding decoded moments gives the same
  bytes, so save -> load -> continue equals not stopping).
* **torch's AdamW** (megatron's fallback without apex or TransformerEngine) creates its state
  lazily at the first step, but megatron's distributed optimizer reads ``state['step']`` while
  building the state dict it loads into: the state is primed with zeros first (overwritten
  by the load). megatron restores the iteration into each param group's ``step`` but not
  into the per-parameter ``state['step']`` AdamW's bias correction reads (and where it does,
  one tensor is shared by all parameters, which AdamW increments in place): every parameter
  gets its own counter equal to its group's step after the load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ling_pretrain.optim.adam8bit import Adam8bit, fp32_moments, inner_optimizers


def sharding_metadata(optimizer: Any = None) -> dict:
    """How megatron's distributed optimizer lays out its state in a checkpoint.

    ``fully_reshardable`` keys optimizer states by parameter, so a checkpoint resumes under
    any TP/PP/EP/DP layout. megatron-core cannot load that format into torch's AdamW (its
    fallback without apex or TransformerEngine) or into the 8-bit Adam, which keeps the same
    per-parameter ``step``: it copies every per-parameter state key, including the ``step``
    that format does not save. With those ``dp_reshardable`` is used, which resumes across
    data-parallel sizes only; weights reshard across every layout either way.
    """
    from megatron.core.optimizer import distrib_optimizer

    eight_bit = any(isinstance(o, Adam8bit) for o in inner_optimizers(optimizer))
    full = distrib_optimizer.HAVE_APEX_OR_TE and not eight_bit
    kind = "fully_reshardable" if full else "dp_reshardable"
    return {"distrib_optim_sharding_type": kind, "chained_optim_avoid_prefix": True}


@contextlib.contextmanager
def saving(optimizer: Any) -> Iterator[None]:
    """Around building and writing the optimizer's sharded state dict (``optimizer`` may be
    None: nothing to do)."""
    with fp32_moments(optimizer, loading=False):
        yield


@contextlib.contextmanager
def loading(optimizer: Any) -> Iterator[None]:
    """Around building the optimizer's sharded state dict, reading it and
    ``optimizer.load_state_dict`` (``optimizer`` may be None: nothing to do)."""
    if optimizer is None:
        yield
        return
    _prime_adam_state(optimizer)
    with fp32_moments(optimizer, loading=True):
        yield
        _restore_adam_steps(optimizer)


def _prime_adam_state(optimizer: Any) -> None:
    """Create the (zero) Adam state torch creates lazily at the first step."""
    for inner in inner_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam):
            continue  # apex / TE FusedAdam keep the step elsewhere; Adam8bit shows fp32 state
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault(
                        "exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )
                    state.setdefault(
                        "exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )


def _restore_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own ``state['step']`` equal to its restored group's step."""
    for inner in inner_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, Adam8bit)):
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
