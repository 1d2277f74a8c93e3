"""Training metrics: the values megatron-core tracks (MTP loss, z-loss), reduced over the
global batch, and the writer that sends each step's record to the sinks.

Rank 0 writes; the values it writes have already been reduced over all ranks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ling_pretrain.train.sinks import Sink, build_sinks

logger = logging.getLogger(__name__)


def _from_reporter(value: torch.Tensor | float, is_reporter: bool, device: torch.device) -> float:
    """Collective: the value held by the reporting rank(s), summed, on every rank."""
    t = torch.zeros(2, dtype=torch.float64, device=device)
    if is_reporter:
        t[0] = float(value)
        t[1] = 1.0
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def mtp_loss(num_microbatches: int, device: torch.device) -> float | None:
    """Mean MTP loss of the last step (all MTP layers summed), then clear megatron's tracker.

    Collective over the world; None when the model has no MTP layer.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    helper = MTPLossLoggingHelper
    tracker = helper.tracker
    # megatron-core 0.16 keeps "values"; 0.17+ renamed it "loss_values" (and the methods).
    key = "loss_values" if "loss_values" in tracker else "values"
    has = key in tracker
    value = 0.0
    if has:
        reduce = getattr(helper, "reduce_metrics_in_tracker", None) or helper.reduce_loss_in_tracker
        clean = getattr(helper, "clean_metrics_in_tracker", None) or helper.clean_loss_in_tracker
        reduce()
        value = float(tracker[key].sum()) / num_microbatches
        clean()
    reporter = has and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    result = _from_reporter(value, reporter, device)
    return None if math.isnan(result) else result


def z_loss(num_microbatches: int, device: torch.device) -> float | None:
    """Mean router z-loss per MoE layer of the last step over the global batch, then clear
    megatron's tracker. Collective over the world.

    Each router records the mean over its own tokens, and megatron-core 0.16 records the
    z-loss with no group to reduce it over (only pipeline stages are summed), so every
    data-parallel rank (and, under sequence parallelism, every tensor-parallel rank) holds the
    mean of its share of the batch only. Every rank routes the same number of tokens, so the
    mean over the tensor x data x context-parallel group is the mean over the global batch.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    reduce_aux_losses_tracker_across_ranks(track_names=list(tracker))
    value, has = 0.0, "z_loss" in tracker
    if has:
        values = tracker["z_loss"]["values"]
        group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(group) > 1:
            values = values.clone()
            dist.all_reduce(values, group=group)  # gloo has no AVG
            values /= dist.get_world_size(group)
        # z-loss is strictly positive for every MoE layer that ran; counting those avoids
        # depending on whether this megatron-core version tracks the MTP layer's router.
        layers = int((values != 0).sum()) or 1
        value = float(values.sum()) / layers / num_microbatches
    clear_aux_losses_tracker()
    reporter = has and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    result = _from_reporter(value, reporter, device)
    return None if math.isnan(result) else result


class MetricsWriter:
    """Fans each metrics record out to the sinks (:mod:`ling_pretrain.train.sinks`), on rank 0.

    Args:
        output_dir: the run directory (``metrics.jsonl``, ``tensorboard/``).
        cfg: the job config (``logging`` says which sinks).
        resume_step: the step the run starts from (``metrics.jsonl`` keeps earlier steps).
        extra_sinks: more sinks to feed (e.g. a benchmark's in-memory collector).
    """

    def __init__(
        self,
        output_dir: str,
        cfg: Any,
        resume_step: int = 0,
        extra_sinks: Sequence[Sink] = (),
    ):
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.sinks: list[Sink] = []
        if self.enabled:
            self.sinks = [*build_sinks(cfg, output_dir, resume_step), *extra_sinks]

    def log(self, record: dict) -> None:
        """Write one step's metrics to every sink (rank 0); a failing sink is dropped."""
        for sink in list(self.sinks):
            try:
                sink.log(record, record["step"])
            except Exception:
                logger.warning(
                    "metrics sink %s failed and is turned off for this run",
                    type(sink).__name__,
                    exc_info=True,
                )
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.warning("closing metrics sink %s failed", type(sink).__name__, exc_info=True)
