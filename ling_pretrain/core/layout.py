"""The parallel layout of a job: sizes derived from ``cfg.parallel`` and the world size, and
the checks that a layout fits the processes, the batch and the model's shapes.

Model fields read here exist in every model family (heads, query groups, layers, vocabulary);
the expert checks apply only to models with routed experts (``model.num_moe_experts`` set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DISPATCHERS = ("alltoall", "allgather", "flex")
"""``parallel.moe_token_dispatcher_type`` values."""


@dataclass(frozen=True)
class Layout:
    """Derived parallel sizes of a job."""

    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    vpp: int | None
    dp: int
    expert_dp: int
    num_microbatches: int


def derive_layout(cfg: Any, world_size: int) -> Layout:
    """Parallel sizes implied by ``cfg.parallel`` and ``world_size`` (assumes a valid config)."""
    p = cfg.parallel
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    dp = world_size // (tp * pp * cp)
    expert_dp = world_size // (etp * ep * pp)
    mb = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * dp)
    return Layout(
        world_size, tp, pp, cp, ep, etp, p.virtual_pipeline_model_parallel_size, dp, expert_dp, mb
    )


def has_experts(model_cfg: Any) -> bool:
    """Whether the model has routed experts (a mixture-of-experts model)."""
    return bool(getattr(model_cfg, "num_moe_experts", None))


def _check_world_size(cfg: Any, world_size: int, errors: list[str]) -> None:
    """Checks that depend on the number of processes (data-parallel size, batch split)."""
    p, t = cfg.parallel, cfg.trainer
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size
    model_par = tp * pp * cp
    if world_size % model_par:
        errors.append(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {tp} x {pp} x {cp} = "
            f"{model_par}: world size = TP x PP x CP x DP. Launch a multiple of {model_par} "
            "processes or change the parallel sizes."
        )
        return
    dp = world_size // model_par
    if world_size % (etp * ep * pp):
        errors.append(
            f"world size {world_size} is not a multiple of expert_tensor_parallel_size x "
            f"expert_model_parallel_size x pipeline_model_parallel_size = {etp} x {ep} x {pp}; "
            "choose an EP that divides the processes of one pipeline stage."
        )
    if (tp * cp * dp) % (ep * etp):
        errors.append(
            f"expert_model_parallel_size x expert_tensor_parallel_size = {ep * etp} must divide "
            f"TP x CP x DP = {tp * cp * dp}, the ranks of one pipeline stage."
        )
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        errors.append("trainer.micro_batch_size and trainer.global_batch_size must be >= 1.")
    elif t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}; "
            f"use a multiple of {t.micro_batch_size * dp}."
        )
    elif vpp and (t.global_batch_size // (t.micro_batch_size * dp)) % pp:
        errors.append(
            "the interleaved (VPP) schedule needs the number of micro-batches "
            f"({t.global_batch_size // (t.micro_batch_size * dp)}) to be a multiple of "
            f"pipeline_model_parallel_size={pp}; raise trainer.global_batch_size."
        )


def check_layout(cfg: Any, world_size: int, errors: list[str]) -> None:
    """Append every reason the layout cannot run ``cfg.model`` on ``world_size`` processes."""
    p, m = cfg.parallel, cfg.model
    sizes = {
        "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
        "parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "parallel.context_parallel_size": p.context_parallel_size,
        "parallel.expert_model_parallel_size": p.expert_model_parallel_size,
        "parallel.expert_tensor_parallel_size": p.expert_tensor_parallel_size,
    }
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
    if bad:
        errors.append(f"parallel sizes must be >= 1: {', '.join(bad)}.")
        return
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    ep = p.expert_model_parallel_size
    moe = has_experts(m)

    if m.num_attention_heads % tp:
        errors.append(
            f"tensor_model_parallel_size={tp} does not divide model.num_attention_heads="
            f"{m.num_attention_heads}; use a TP that divides it."
        )
    if m.num_query_groups % tp:
        errors.append(
            f"tensor_model_parallel_size={tp} does not divide model.num_query_groups="
            f"{m.num_query_groups} (key/value heads); use TP <= {m.num_query_groups} that divides it."
        )
    if m.vocab_size % tp:
        errors.append(
            f"model.vocab_size={m.vocab_size} is not divisible by "
            f"parallel.tensor_model_parallel_size={tp}: the embedding and the output layer split "
            "the vocabulary evenly across TP ranks. Pick a TP size that divides it."
        )
    if moe:
        if m.num_moe_experts % ep:
            errors.append(
                f"expert_model_parallel_size={ep} does not divide model.num_moe_experts="
                f"{m.num_moe_experts}; use an EP that divides it."
            )
        if tp > 1 and not p.sequence_parallel:
            errors.append(
                f"MoE with tensor_model_parallel_size={tp} needs parallel.sequence_parallel=true "
                "(megatron-core refuses MoE + TP without it); add parallel.sequence_parallel=true."
            )
        if p.moe_token_dispatcher_type not in DISPATCHERS:
            errors.append(
                f"parallel.moe_token_dispatcher_type={p.moe_token_dispatcher_type!r} is not one "
                f"of {', '.join(DISPATCHERS)}."
            )
    elif ep > 1 or p.expert_tensor_parallel_size > 1:
        errors.append(
            f"model {m.name} has no routed experts: parallel.expert_model_parallel_size and "
            "parallel.expert_tensor_parallel_size must be 1 (got "
            f"{ep} and {p.expert_tensor_parallel_size})."
        )
    if p.sequence_parallel and tp == 1:
        errors.append(
            "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1; set "
            "parallel.sequence_parallel=false, or raise the TP size."
        )

    vpp = p.virtual_pipeline_model_parallel_size
    stages = pp * (vpp or 1)
    if vpp is not None and (vpp < 1 or pp < 2):
        errors.append(
            "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size"
            f" >= 2 and a value >= 1 (got PP={pp}, VPP={vpp}); set it to null for no VPP."
        )
    elif m.num_layers % stages:
        what = f"pipeline_model_parallel_size={pp}" + (
            f" x virtual_pipeline_model_parallel_size={vpp}" if vpp else ""
        )
        errors.append(
            f"model.num_layers={m.num_layers} is not divisible by {what} = {stages} model "
            "chunks; choose sizes whose product divides the number of layers."
        )

    _check_world_size(cfg, world_size, errors)

    seq = cfg.data.seq_length
    if p.sequence_parallel and seq % (tp * cp):
        errors.append(
            f"data.seq_length={seq} must be divisible by TP x CP = {tp * cp}; set data.seq_length "
            f"to a multiple of {tp * cp}."
        )
    if cp > 1 and seq % (2 * cp):
        errors.append(
            f"data.seq_length={seq} must be divisible by 2 x context_parallel_size = {2 * cp}; "
            f"set data.seq_length to a multiple of {2 * cp}."
        )
    if seq > m.max_position_embeddings:
        errors.append(
            f"data.seq_length={seq} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}: set data.seq_length<={m.max_position_embeddings} "
            "(or a model preset built for longer sequences)."
        )
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        errors.append(
            "parallel.overlap_param_gather=true needs use_distributed_optimizer=true and "
            "overlap_grad_reduce=true."
        )
