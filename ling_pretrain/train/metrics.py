"""Training metrics: one console line and one ``metrics.jsonl`` object per logged step.

Rank 0 writes; the values it writes have already been reduced over all ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
import torch.distributed as dist

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
    """Console lines, ``metrics.jsonl`` and (optionally) W&B, from rank 0 only."""

    def __init__(self, output_dir: str, cfg: Any, resume_step: int = 0):
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step > 0 and os.path.exists(self.path):
            self._truncate_after(resume_step)
        if cfg.logging.wandb:
            import wandb
            from omegaconf import OmegaConf

            self._wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.run.name,
                dir=output_dir,
                config=OmegaConf.to_container(cfg, resolve=True),
                resume="allow",
            )

    def _truncate_after(self, step: int) -> None:
        """Drop lines for steps after a resumed checkpoint, so the curve has no duplicates."""
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        """Write one step's metrics (rank 0)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {record['step']:>6}"]
        for key, fmt in (
            ("loss", "loss {:.4f}"),
            ("mtp_loss", "mtp {:.4f}"),
            ("val_loss", "val {:.4f}"),
            ("lr", "lr {:.3e}"),
            ("grad_norm", "gnorm {:.3f}"),
            ("expert_load_max_violation", "maxvio {:.2f}"),
            ("tokens_per_sec", "tok/s {:,.0f}"),
            ("step_time", "{:.2f}s/step"),
        ):
            if record.get(key) is not None:
                parts.append(fmt.format(record[key]))
        logger.info(" | ".join(parts))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
