"""MoE bookkeeping around megatron's gradient finalisation: expert-load statistics.

megatron-core updates the expert bias inside ``finalize_model_grads`` from each router's
``local_tokens_per_expert`` and then zeroes those counts, so the load has to be read just
before. The statistic is DeepSeek-V3's MaxVio: ``max_e(c_e) / mean(c) - 1`` per MoE layer
(0 is perfect balance), averaged over layers, from the counts of the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _routers(model: list) -> list:
    return [
        m
        for chunk in model
        for m in chunk.modules()
        if hasattr(m, "local_tokens_per_expert") and getattr(m, "expert_bias", None) is not None
    ]


def expert_load_max_violation(model: list, device: torch.device) -> float | None:
    """MaxVio of the global batch so far, averaged over MoE layers. Collective over the world."""
    from megatron.core import parallel_state as ps

    routers = _routers(model)
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    if routers:
        counts = torch.stack([r.local_tokens_per_expert.detach().float() for r in routers])
        dist.all_reduce(
            counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        )
        mean = counts.mean(dim=1).clamp_min(1e-9)
        violation = counts.max(dim=1).values / mean - 1.0
        if (
            ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank(with_context_parallel=True) == 0
        ):
            stats[0] = violation.sum()
            stats[1] = len(routers)
    dist.all_reduce(stats)
    return float(stats[0] / stats[1]) if stats[1] > 0 else None


def make_finalize_model_grads(stats: dict, device: torch.device) -> Callable:
    """megatron's ``finalize_model_grads`` that first records the expert load in ``stats``."""
    from megatron.core.distributed import finalize_model_grads

    def finalize(model: list, *args: Any, **kwargs: Any):
        stats["expert_load_max_violation"] = expert_load_max_violation(model, device)
        return finalize_model_grads(model, *args, **kwargs)

    return finalize
