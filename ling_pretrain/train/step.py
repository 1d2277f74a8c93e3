"""One training step: forward/backward over micro-batches, then the optimizer step."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from ling_pretrain.train.bad_steps import (
    FP16_OVERFLOW,
    BadStepPolicy,
    apply_fault,
    inject,
    step_unless_bad,
    verdict,
)
from ling_pretrain.train.moe import restore_expert_bias

logger = logging.getLogger(__name__)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, fault: str | None = None):
    """Per-token cross entropy summed over unmasked tokens, with the token count.

    megatron's schedule (``calculate_per_token_loss``) divides by the token count of the
    whole global batch, so the loss and gradients do not depend on how the batch is split.
    ``fault`` is an injected fault (``trainer.inject_*_steps``, see ``train.bad_steps``).
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = apply_fault(torch.sum(losses * mask), fault)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum()])}


def forward_step(data_iterator: Iterator[dict], model: Any, fault: str | None = None):
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
    return output, partial(_loss_func, loss_mask, fault=fault)


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
    """Whether the step was skipped: nothing was updated (see ``train.bad_steps``)."""
    skip_reason: str | None = None
    """Why it was skipped."""


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


def train_step(
    parts: Any, num_microbatches: int, step: int = 0, policy: BadStepPolicy | None = None
) -> StepResult:
    """Run one global batch through forward/backward and step the optimizer and schedule,
    unless ``policy`` finds the step bad: then nothing is updated (``train.bad_steps``).

    ``step`` is the number of the step being taken (1 for the first), for fault injection.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = parts.cfg
    policy = policy or BadStepPolicy(cfg.trainer)
    last_dp_rank = ps.get_data_parallel_rank() == ps.get_data_parallel_world_size() - 1
    fault = inject(cfg.trainer, step, last_dp_rank)
    for chunk in parts.model:
        chunk.zero_grad_buffer()
    with warnings.catch_warnings():
        # megatron's distributed optimizer checks .grad of its fp32 shards, which for fp32
        # parameters are views (non-leaf tensors); torch warns about reading it, harmlessly.
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not")
        parts.optimizer.zero_grad()
    iters = weighted_microbatches(parts.train_iters, num_microbatches, cfg.model.mtp_num_layers)
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, fault=fault) if fault else forward_step,
        data_iterator=iters,
        model=parts.model,
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.trainer.micro_batch_size,
        forward_only=False,
    )
    loss, tokens = reduce_lm_loss(losses, parts.device)
    ok, grad_norm, reason = step_unless_bad(
        parts.optimizer, lambda norm: verdict(policy, loss, norm, parts.device)
    )
    if ok:
        parts.scheduler.step(increment=1)
    else:
        restore_expert_bias(parts.step_stats)
        if dist.get_rank() == 0:
            logger.warning("step %d skipped: %s", step, reason)
    if reason != FP16_OVERFLOW:  # megatron's own fp16 skip: neither good nor bad
        policy.update(loss, reason)
    return StepResult(loss, tokens, grad_norm, not ok, reason)


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
