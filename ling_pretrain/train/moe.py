"""MoE bookkeeping around megatron's gradient finalisation: expert load and the bias update.

megatron-core updates the expert bias inside ``finalize_model_grads`` from each router's
``local_tokens_per_expert`` (tokens routed to each expert during the global batch, counted by
the router before any FP8 padding of the routing map) and then zeroes those counts, so
everything that needs the counts runs just before it:

* the load statistics: DeepSeek-V3's MaxVio ``max_e(c_e) / mean(c) - 1`` per MoE layer
  (0 is perfect balance), averaged over layers, and per layer the most and least loaded
  expert's count over the mean;
* Ling's zero-mean variant of the bias update. megatron-core's rule is
  ``bias += rate * sign(mean(c) - c_e)``; Ling's framework subtracts the mean of that step
  over the experts, ``bias += rate * (delta - mean(delta))``, so a layer's biases never drift
  as a whole (with an odd number of over-loaded experts the plain rule moves them all).
  megatron-core has no switch for it, so the wrapper records the biases and the global
  counts, lets megatron run its own update, and then writes the zero-mean result over it.
  Doing it this way (rather than replacing ``finalize_model_grads``) keeps every other part
  of megatron's finalisation, whatever the release.

The biases as they were before the update are kept until the next step, so a step found bad
after the gradients are final (``train.bad_steps``) can put them back exactly
(:func:`restore_expert_bias`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ling_pretrain.models.checks import BIAS_UPDATES


def _routers(model: list) -> list:
    return [
        m
        for chunk in model
        for m in chunk.modules()
        if hasattr(m, "local_tokens_per_expert") and getattr(m, "expert_bias", None) is not None
    ]


def _layer_number(router: Any, num_layers: int) -> int:
    """The 1-based number of a router's layer in the model, MTP layers after the decoder's.

    megatron-core 0.16 numbers MTP layers after the decoder's (``num_layers + j``); 0.19
    numbers them from 1 within the MTP block and marks their routers ``is_mtp_layer``.
    """
    if getattr(router, "is_mtp_layer", False):
        return num_layers + router.layer_number
    return router.layer_number


def global_expert_counts(routers: list) -> torch.Tensor | None:
    """Tokens routed to each expert in the global batch so far, ``[layers, experts]`` (fp32).

    Summed over micro-batches (the routers accumulate) and over the tensor x context x data
    parallel group, as megatron-core does for its own update. Collective over that group;
    None when this rank holds no router.
    """
    from megatron.core import parallel_state as ps

    if not routers:
        return None
    counts = torch.stack([r.local_tokens_per_expert.detach().float() for r in routers])
    dist.all_reduce(counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
    return counts


def zero_mean_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Ling's update: ``bias + rate * (delta - mean(delta))``, ``delta = sign(mean(c) - c)``.

    Works on ``[experts]`` or stacked ``[layers, experts]`` tensors (mean over the last dim).
    """
    delta = torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
    return bias + rate * (delta - delta.mean(dim=-1, keepdim=True))


def expert_load(
    counts: torch.Tensor | None, layer_numbers: list[int], total_layers: int, device: torch.device
) -> dict:
    """Expert-load statistics of a global batch, from :func:`global_expert_counts`.

    Collective (world): the MoE layers of every pipeline stage are gathered. Returns
    ``expert_load_max_violation`` (MaxVio averaged over MoE layers) and, per MoE layer
    (megatron's 1-based layer number as a string; MTP layer ``j`` is ``num_layers + j``),
    ``expert_load_max`` and ``expert_load_min``: the most and least loaded expert's routed
    tokens over the mean per expert (1.0 is perfect balance). None where there is no MoE layer.

    Args:
        counts: ``[layers, experts]`` routed-token counts of this rank's routers, or None.
        layer_numbers: megatron's ``layer_number`` of each of those routers.
        total_layers: decoder plus MTP layers of the whole model.
        device: where the collective's tensor lives.
    """
    from megatron.core import parallel_state as ps

    stats = torch.zeros(2 + 2 * total_layers, dtype=torch.float64, device=device)
    if counts is not None and (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    ):
        mean = counts.mean(dim=1).clamp_min(1e-9)
        high = (counts.max(dim=1).values / mean).double()
        low = (counts.min(dim=1).values / mean).double()
        stats[0] = (high - 1.0).sum()
        stats[1] = counts.shape[0]
        index = torch.tensor([n - 1 for n in layer_numbers], device=device)
        stats[2 + index] = high
        stats[2 + total_layers + index] = low
    dist.all_reduce(stats)
    if stats[1] == 0:
        return {"expert_load_max_violation": None, "expert_load_max": None, "expert_load_min": None}
    values = stats[2:].view(2, total_layers).tolist()
    layers = [i for i in range(total_layers) if values[0][i] > 0]  # the max is >= 1 if present
    return {
        "expert_load_max_violation": float(stats[0] / stats[1]),
        "expert_load_max": {str(i + 1): values[0][i] for i in layers},
        "expert_load_min": {str(i + 1): values[1][i] for i in layers},
    }


def make_finalize_model_grads(
    stats: dict, device: torch.device, bias_update: str = "megatron"
) -> Callable:
    """megatron's ``finalize_model_grads``, recording the expert load in ``stats`` first and
    applying the expert-bias rule ``bias_update`` (one of :data:`BIAS_UPDATES`)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    if bias_update not in BIAS_UPDATES:
        raise ValueError(f"bias_update={bias_update!r} must be one of {BIAS_UPDATES}")

    found: dict[tuple, list] = {}  # the routers of the model chunks, found once (a module walk)

    def finalize(model: list, *args: Any, **kwargs: Any):
        key = tuple(id(chunk) for chunk in model)  # the schedule passes a new list each step
        if key not in found:
            found.clear()
            found[key] = _routers(model)
        routers = found[key]
        counts = global_expert_counts(routers)
        config = get_model_config(model[0])
        total = config.num_layers + (config.mtp_num_layers or 0)
        numbers = [_layer_number(r, config.num_layers) for r in routers]
        stats.update(expert_load(counts, numbers, total, device))
        before = [r.expert_bias.detach().clone() for r in routers]
        stats[_BIAS_BEFORE] = list(zip(routers, before, strict=True))
        if bias_update == "megatron" or counts is None:
            return finalize_model_grads(model, *args, **kwargs)
        result = finalize_model_grads(model, *args, **kwargs)
        with torch.no_grad():
            for router, bias, c in zip(routers, before, counts, strict=True):
                rate = router.config.moe_router_bias_update_rate
                router.expert_bias.copy_(zero_mean_bias(bias, c, rate))
        return result

    return finalize


_BIAS_BEFORE = "expert_bias_before_update"


def restore_expert_bias(stats: dict) -> None:
    """Put back the expert biases of the last step as they were before its update (a no-op
    when the model has no expert bias)."""
    with torch.no_grad():
        for router, bias in stats.get(_BIAS_BEFORE, ()):
            router.expert_bias.copy_(bias)
