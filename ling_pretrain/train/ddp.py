"""megatron-core's DistributedDataParallel around the model chunks (model-independent).

The one place that builds megatron-core's ``DistributedDataParallelConfig``.
"""

from __future__ import annotations

from typing import Any


def build_ddp_config(cfg: Any):
    """megatron-core ``DistributedDataParallelConfig`` for a job config."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # Off: megatron raises on the first non-finite gradient; the trainer skips such a
        # step instead and stops only when bad steps persist (train.bad_steps).
        check_for_nan_in_grad=False,
        bucket_size=None if not p.overlap_grad_reduce else 40_000_000,
        average_in_collective=False,
    )


def wrap_ddp(cfg: Any, chunks: list) -> list:
    """Wrap model chunks in megatron's DistributedDataParallel."""
    from megatron.core.distributed import DistributedDataParallel

    ddp_config = build_ddp_config(cfg)
    return [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]
