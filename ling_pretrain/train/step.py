"""One training step: forward/backward over micro-batches, then the optimizer step."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token cross entropy summed over unmasked tokens, with the token count.

    megatron's schedule (``calculate_per_token_loss``) divides by the token count of the
    whole global batch, so the loss and gradients do not depend on how the batch is split.
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum()])}


def forward_step(data_iterator: Iterator[dict], model: Any):
    """megatron ``forward_step_func``: one micro-batch through one model chunk."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    # megatron uses the mask it is given for MTP only; the weight makes MTP a per-token mean
    # over the global batch (see ling_pretrain.train.mtp).
    output = model(
        input_ids=tokens,
        position_ids=position_ids,
        attention_mask=None,
        labels=labels,
        loss_mask=loss_mask * batch.get("mtp_mask_weight", 1.0),
    )
    return output, partial(_loss_func, loss_mask)


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    """Token-mean LM loss over the global batch."""
    tokens: int
    """Loss tokens in the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    skipped: bool
    """Whether the optimizer skipped the update (non-finite gradients)."""


def reduce_lm_loss(losses: list[dict], device: torch.device) -> tuple[float, int]:
    """Sum (loss, tokens) over micro-batches and all ranks; only last-stage ranks contribute.

    Only tensor-parallel rank 0 of the last pipeline stage contributes (other TP ranks hold
    copies; other stages hold nothing); context-parallel ranks hold disjoint tokens and all
    contribute. The sum is all-reduced over the world so every rank, rank 0 included (it
    logs), knows the result.
    """
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    is_reporter = (
        ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    )
    if is_reporter:
        for item in losses:
            total += item["lm loss"].to(device=device, dtype=torch.float64)
    dist.all_reduce(total)
    tokens = int(total[1].item())
    return (float(total[0] / total[1]) if tokens else float("nan")), tokens


def weighted_microbatches(iters: list, num_microbatches: int, mtp_layers: int) -> list:
    """This step's micro-batches, one iterator per model chunk, with MTP mask weights.

    Reads the whole global batch first: the MTP weights need its token counts (collective
    over the data-parallel group).
    """
    from megatron.core import parallel_state as ps

    from ling_pretrain.train.mtp import mtp_mask_weights

    batches = [[next(it) for _ in range(num_microbatches)] for it in iters]
    group = ps.get_data_parallel_group(with_context_parallel=True)
    weights = mtp_mask_weights(batches[0], mtp_layers, group)
    for chunk_batches in batches:
        for batch, w in zip(chunk_batches, weights, strict=True):
            batch["mtp_mask_weight"] = w
    return [iter(b) for b in batches]


def train_step(parts: Any, num_microbatches: int) -> StepResult:
    """Run one global batch through forward/backward and step the optimizer and schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = parts.cfg
    for chunk in parts.model:
        chunk.zero_grad_buffer()
    with warnings.catch_warnings():
        # megatron's distributed optimizer checks .grad of its fp32 shards, which for fp32
        # parameters are views (non-leaf tensors); torch warns about reading it, harmlessly.
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not")
        parts.optimizer.zero_grad()
    iters = weighted_microbatches(parts.train_iters, num_microbatches, cfg.model.mtp_num_layers)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=parts.model,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.trainer.micro_batch_size,
        forward_only=False,
    )
    ok, grad_norm, _ = parts.optimizer.step()
    if ok:
        parts.scheduler.step(increment=1)
    loss, tokens = reduce_lm_loss(losses, parts.device)
    return StepResult(loss, tokens, float(grad_norm or 0.0), not ok)


@torch.no_grad()
def eval_step(parts: Any, iters: list, num_microbatches: int) -> tuple[float, int]:
    """Forward-only pass over ``num_microbatches`` validation micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = parts.cfg
    for chunk in parts.model:
        chunk.eval()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=parts.model,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.trainer.micro_batch_size,
        forward_only=True,
    )
    for chunk in parts.model:
        chunk.train()
    return reduce_lm_loss(losses, parts.device)
