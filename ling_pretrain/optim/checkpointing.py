"""How an optimizer's state goes into and comes out of a megatron distributed checkpoint.

The checkpoint code (:mod:`ling_pretrain.checkpoint.dist`) calls four things and knows
nothing else about optimizers: :func:`sharded_state_dict` (what to save, or what to read from
a given checkpoint), :func:`load_state_dict` (put what was read into the optimizer), and the
:func:`saving` / :func:`loading` context managers around a save and a load.

**The format.** The distributed optimizer's state is saved in megatron's
``fully_reshardable`` layout: every fp32 master weight and both Adam moments as tensors of
their parameter's full shape, keyed by the parameter's checkpoint key, so a checkpoint
resumes under any TP/PP/EP/ETP/DP layout (saving gathers each model-parallel shard's state
over its data-parallel group, which costs host memory of 12 bytes per parameter of the shard
while a save or a load runs, on every rank). Checkpoints written before this format
(``dp_reshardable``, keyed by megatron's internal buffers) still load at the tensor,
pipeline and expert parallel sizes they were saved with; elsewhere the run is refused before
anything is read (:func:`sharded_state_dict` says what may change).

What megatron-core does not do here, and this module does:

* **The per-parameter ``step``.** torch's AdamW (megatron's fallback without apex or
  TransformerEngine) and the 8-bit Adam keep a ``step`` in every parameter's state.
  ``fully_reshardable`` does not save it (the step is the param groups'), and megatron's
  copy of the loaded tensors into the optimizer then fails on the missing key (``KeyError:
  'step'``). :func:`load_state_dict` hides the counters while megatron copies the tensors in,
  then gives every parameter its own counter equal to its group's step (megatron shares one
  tensor between all parameters where it sets them, which AdamW increments in place).
* **The non-tensor part at another layout.** Beside the tensors a checkpoint holds each
  optimizer's param groups (hyper-parameters and the step), as written by rank 0. megatron
  chains one optimizer for dense and one for expert-parallel parameters, and how many there
  are depends on the layout (experts get their own once EP > 1, or TP > 1 with ETP < TP), so
  after a layout change the saved groups no longer line up with the optimizer's.
  :func:`load_state_dict` gives each optimizer the saved groups that match its own (by
  megatron's group identity: weight-decay and lr multipliers, expert-parallel, ...), and
  for groups the checkpoint has no counterpart of, the optimizer's own hyper-parameters with
  the saved step.
* **Lazy state.** torch's AdamW creates its state at the first step, but megatron reads
  ``state['step']`` when it builds the state dict to save or to load into: the state is
  primed with zeros (exactly what torch would create), so an optimizer that has not stepped
  yet (every step so far skipped as bad) can be saved and loaded.
* **8-bit Adam** (:class:`~ling_pretrain.optim.adam8bit.Adam8bit`) shows its moments as fp32
  under torch AdamW's names while megatron reads or writes the state, so checkpoints hold
  plain Adam's format: an 8-bit checkpoint loads into plain Adam and back. After a save the
  8-bit state is put back untouched; after a load the fp32 moments are encoded (encoding
  decoded moments gives the same bytes, so save -> load -> continue at the same layout equals
  not stopping; at another layout the blocks of 256 fall elsewhere and the moments are
  re-rounded once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.optim.adam8bit import Adam8bit, fp32_moments, inner_optimizers

FULLY_RESHARDABLE = "fully_reshardable"
SAVE_FORMAT = FULLY_RESHARDABLE
"""megatron's distributed-optimizer checkpoint layout this trainer writes."""


def sharding_metadata(sharding_type: str) -> dict:
    """The ``metadata`` argument of megatron's ``sharded_state_dict`` for a layout."""
    return {"distrib_optim_sharding_type": sharding_type, "chained_optim_avoid_prefix": True}


def _parts(optimizer: Any) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained) if chained is not None else [optimizer]


def _is_distributed(part: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(part, DistributedOptimizer)


def _saved_entries(node: Any) -> list[dict]:
    """The per-optimizer entries of a saved (or loaded) optimizer state: the top level for
    one optimizer, else the chained optimizers' entries in order."""
    if not isinstance(node, dict):
        return []
    if any(not isinstance(k, int) for k in node):
        return [node]
    return [node[k] for k in sorted(node) if isinstance(node[k], dict)]


def saved_layout(checkpoint_dir: str | Path) -> dict:
    """What a checkpoint's optimizer state is: ``{"distributed": bool, "sharding_type": str |
    None, "parts": int}`` (``sharding_type`` None: no optimizer state; ``parts``: how many
    chained optimizers saved it). Reads only the checkpoint's small common part."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    saved = common.get("optimizer") if isinstance(common, dict) else None
    if saved is None:
        return {"distributed": False, "sharding_type": None, "parts": 0}
    entries = _saved_entries(saved)
    types = {e.get("param_state_sharding_type") for e in entries} - {None}
    if not types:
        return {"distributed": False, "sharding_type": "non-distributed", "parts": len(entries)}
    return {"distributed": True, "sharding_type": sorted(types)[0], "parts": len(entries)}


def _layout_words() -> str:
    from megatron.core import parallel_state as ps

    return (
        f"TP={ps.get_tensor_model_parallel_world_size()} "
        f"PP={ps.get_pipeline_model_parallel_world_size()} "
        f"EP={ps.get_expert_model_parallel_world_size()} "
        f"ETP={ps.get_expert_tensor_parallel_world_size()} "
        f"DP={ps.get_data_parallel_world_size()}"
    )


def _kind_problem(optimizer: Any, saved: dict, checkpoint_dir: str | Path) -> str | None:
    """Why this rank's optimizer cannot take the checkpoint's kind of optimizer state, if so."""
    parts = _parts(optimizer)
    distributed = all(_is_distributed(p) for p in parts)
    if saved["sharding_type"] is None:
        return None
    if saved["distributed"] != distributed:
        was = "with" if saved["distributed"] else "without"
        return (
            f"checkpoint {checkpoint_dir} was saved {was} the distributed optimizer, and its "
            "optimizer state loads only into the same kind of optimizer. Set "
            f"parallel.use_distributed_optimizer={str(saved['distributed']).lower()} to resume "
            "it (TP, PP, EP, ETP and DP may all change), or take its weights only with "
            f"checkpoint.init_from={checkpoint_dir} (fresh optimizer, step 0)."
        )
    if not distributed and saved["parts"] != len(parts):
        return (
            f"checkpoint {checkpoint_dir} was saved with parallel.use_distributed_optimizer=false "
            f"by a layout whose optimizer had {saved['parts']} part(s), and this layout "
            f"({_layout_words()}) has {len(parts)}: megatron-core keeps expert parameters in an "
            "optimizer of their own when EP > 1, or when TP > ETP, and cannot load the "
            "non-distributed optimizer's state across that change. Keep that condition as it "
            "was (TP, PP and DP may change otherwise), or take its weights only with "
            f"checkpoint.init_from={checkpoint_dir}. Checkpoints of the distributed optimizer "
            "(parallel.use_distributed_optimizer=true) reshard across every layout."
        )
    return None


def _refuse(problem: str | None, checkpoint_dir: str | Path) -> None:
    """Raise :class:`ConfigError` on every rank when any rank found a problem (collective)."""
    import torch.distributed as dist

    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag) == 0:
        return
    raise ConfigError(
        problem
        or f"another rank cannot load the optimizer state of checkpoint {checkpoint_dir} at "
        "this layout; its message is in that rank's log"
    )


def _missing_keys(request: Any, checkpoint_dir: str | Path) -> list[str]:
    """Keys of the sharded tensors and objects in ``request`` that the checkpoint lacks."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    available = set(load_sharded_metadata(str(checkpoint_dir)))
    wanted = set()
    for value in nested_values(request):
        if isinstance(value, ShardedTensor):
            wanted.add(value.key)
        elif isinstance(value, ShardedObject):
            wanted.add(value.unique_key)
    return sorted(wanted - available)


def sharded_state_dict(
    optimizer: Any, model_sharded_state_dict: dict, checkpoint_dir: str | Path | None = None
) -> dict:
    """The optimizer's part of a checkpoint: what to save (``checkpoint_dir`` None), or what
    to read from ``checkpoint_dir`` (in the layout that checkpoint was saved in).

    Collective when loading. Raises:
        ConfigError: before anything is read, when this run cannot load the checkpoint's
            optimizer state (another kind of optimizer, or a ``dp_reshardable`` checkpoint at
            other tensor/pipeline/expert parallel sizes); the message says what may change.
    """
    if checkpoint_dir is None:
        return optimizer.sharded_state_dict(
            model_sharded_state_dict, metadata=sharding_metadata(SAVE_FORMAT)
        )
    saved = saved_layout(checkpoint_dir)
    _refuse(_kind_problem(optimizer, saved, checkpoint_dir), checkpoint_dir)
    kind = saved["sharding_type"] if saved["distributed"] else SAVE_FORMAT
    request = optimizer.sharded_state_dict(
        model_sharded_state_dict, is_loading=True, metadata=sharding_metadata(kind)
    )
    missing = _missing_keys(request, checkpoint_dir)
    _refuse(_missing_problem(missing, kind, checkpoint_dir), checkpoint_dir)
    return request


def _missing_problem(missing: list[str], kind: str, checkpoint_dir: str | Path) -> str | None:
    """Why this rank cannot read its optimizer state from the checkpoint, if so."""
    if not missing:
        return None
    if kind == "dp_reshardable":
        return (
            f"checkpoint {checkpoint_dir} holds its optimizer state in megatron's "
            "dp_reshardable layout (written before optimizer states became fully "
            "reshardable), which loads only at the tensor, pipeline and expert parallel "
            f"sizes it was saved with; this run ({_layout_words()}) needs optimizer state it "
            f"does not hold (e.g. {missing[0]!r}). Resume it at the layout it was saved with "
            "(only the data-parallel size may change) and save once, which writes the "
            "reshardable layout, then change TP/PP/EP/ETP; or take its weights only with "
            f"checkpoint.init_from={checkpoint_dir} (fresh optimizer, step 0)."
        )
    return (
        f"checkpoint {checkpoint_dir} lacks optimizer state this run needs (e.g. "
        f"{missing[0]!r}): it was written for other parameters (another model, or other "
        "parameters trained). Resume it with the model it was saved with, or take its weights "
        f"only with checkpoint.init_from={checkpoint_dir}."
    )


def _group_identity(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)


def _saved_step(entries: list[dict]) -> Any:
    steps = {
        g["step"]
        for e in entries
        for g in e.get("optimizer", {}).get("param_groups", [])
        if g.get("step") is not None
    }
    if len(steps) > 1:
        raise ValueError(f"the checkpoint's optimizers disagree on the step: {sorted(steps)}")
    return steps.pop() if steps else None


def _entry_for(part: Any, index: int, saved: list[dict], param_state: Any) -> dict:
    """The state dict megatron's ``DistributedOptimizer.load_state_dict`` expects for ``part``,
    built from the saved entries whatever optimizer they came from."""
    step = _saved_step(saved)
    own = saved[index] if index < len(saved) else {}
    by_identity: dict[tuple, dict] = {}
    for entry in [*(e for e in saved if e is not own), own]:  # the part's own entry wins
        for group in entry.get("optimizer", {}).get("param_groups", []):
            by_identity[_group_identity(group)] = group
    groups = []
    for group in part.optimizer.param_groups:
        match = by_identity.get(_group_identity(group))
        if match is None:  # a group the saving layout did not have (experts split off)
            match = {k: v for k, v in group.items() if k != "params"}
            if step is not None:
                match["step"] = step
        groups.append(match)
    entry: dict = {
        "optimizer": {"param_groups": groups},
        "param_state_sharding_type": FULLY_RESHARDABLE,
    }
    scaler = own.get(
        "grad_scaler", next((e["grad_scaler"] for e in saved if "grad_scaler" in e), None)
    )
    if scaler is not None:
        entry["grad_scaler"] = scaler
    if param_state is not None:
        entry["param_state"] = param_state
    return entry


def load_state_dict(optimizer: Any, loaded: Any) -> None:
    """Load ``loaded`` (the ``optimizer`` part of what :func:`sharded_state_dict` requested,
    as read) into ``optimizer``, whatever layout wrote it. Call inside :func:`loading`."""
    parts = _parts(optimizer)
    saved = _saved_entries(loaded)
    kinds = {e.get("param_state_sharding_type") for e in saved} - {None}
    if not all(_is_distributed(p) for p in parts) or kinds != {FULLY_RESHARDABLE}:
        # Not the distributed optimizer, or a dp_reshardable checkpoint (same layout only).
        optimizer.load_state_dict(loaded)
        return
    requested = [loaded] if len(parts) == 1 else [loaded.get(i, {}) for i in range(len(parts))]
    for i, part in enumerate(parts):
        entry = _entry_for(part, i, saved, requested[i].get("param_state"))
        param_state = entry.pop("param_state", None)
        part.load_state_dict(entry)
        if param_state is not None:
            with _steps_hidden(part.optimizer):
                part.load_parameter_state_from_fully_reshardable(param_state)
    if len(parts) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


@contextlib.contextmanager
def _steps_hidden(inner: Any) -> Iterator[None]:
    """Take the per-parameter ``step`` out of ``inner``'s state while megatron copies loaded
    tensors into it (it copies every state entry, and ``fully_reshardable`` has no step)."""
    steps = {p: s.pop("step") for p, s in inner.state.items() if "step" in s}
    try:
        yield
    finally:
        for p, step in steps.items():
            inner.state[p]["step"] = step


@contextlib.contextmanager
def saving(optimizer: Any) -> Iterator[None]:
    """Around building and writing the optimizer's sharded state dict (``optimizer`` may be
    None: nothing to do)."""
    if optimizer is not None:
        _prime_adam_state(optimizer)
    with fp32_moments(optimizer, loading=False):
        yield


@contextlib.contextmanager
def loading(optimizer: Any) -> Iterator[None]:
    """Around building the optimizer's sharded state dict, reading it and
    :func:`load_state_dict` (``optimizer`` may be None: nothing to do)."""
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
