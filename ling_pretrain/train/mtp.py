"""MTP loss weighting: Ling's ``loss = lm_loss + scale * mtp_loss``, each a per-token mean.

With ``calculate_per_token_loss`` (which we set, so the loss does not depend on how a global
batch is split) megatron-core back-propagates the *sum* of each micro-batch's masked MTP token
losses times ``mtp_loss_scaling_factor`` and, in ``finalize_model_grads``, divides every
gradient by the LM loss's token count ``N`` of the global batch. MTP predicts one token
further, so its labels and loss mask are rolled left by one and the last position drops out:
it has ``M < N`` tokens and

* megatron-core 0.16.1 computes the gradient of ``lm_loss + scale * (M / N) * mtp_loss``
  (MTP under-weighted by ``M / N``, e.g. 31/32 at sequence length 32);
* megatron-core >= 0.19 multiplies each micro-batch's MTP loss by its own ``N_i / M_i``, which
  is exact only when every micro-batch has the same ratio.

We want the gradient of ``sum(lm token losses) / N + scale * sum(mtp token losses) / M`` with
``N`` and ``M`` counted over the whole global batch (all micro-batches, all data-parallel
ranks), on every release. The loss mask handed to the model is used by megatron-core only
for MTP (our loss function applies its own mask to the LM loss), and multiplying it by a
per-micro-batch constant ``w_i`` multiplies that micro-batch's MTP gradient by ``w_i`` while
leaving every logged MTP value unchanged (they are ratios of masked sums). So the trainer
counts ``N`` and ``M`` before the step and hands the model ``w_i * loss_mask`` with
``w_i = N / M`` on releases that do not rescale, and ``w_i = (N / M) * (M_i / N_i)`` on those
that do. Which kind of release is installed is measured, not guessed from the version number.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist


def mtp_token_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """The MTP loss mask: ``loss_mask`` rolled left by one, last position 0 (``[b, s]``)."""
    rolled = torch.roll(loss_mask, shifts=-1, dims=-1)
    rolled[..., -1] = 0
    return rolled


@functools.cache
def megatron_rescales_mtp_per_microbatch() -> bool:
    """Whether megatron-core scales each micro-batch's MTP loss by its ``N_i / M_i``.

    Measured by running megatron's ``process_mtp_loss`` (absent before the change) on a
    two-token sequence whose rolled mask keeps one token: the gradient reaching the MTP
    token loss is 2 with the rescaling and 1 without.
    """
    from types import SimpleNamespace

    from megatron.core.transformer import multi_token_prediction as mtp

    process = getattr(mtp, "process_mtp_loss", None)
    if process is None:
        return False
    hidden = torch.zeros(4, 1, 1, requires_grad=True)  # [2 * s, b, h]: main then MTP states
    config = SimpleNamespace(
        mtp_num_layers=1,
        mtp_loss_scaling_factor=1.0,
        calculate_per_token_loss=True,
        mtp_detach_heads=False,
    )
    out = process(
        hidden_states=hidden,
        labels=torch.zeros(1, 2, dtype=torch.long),
        loss_mask=torch.ones(1, 2),
        output_layer=lambda h, weight=None, runtime_gather_output=None: (h, None),
        output_weight=None,
        runtime_gather_output=None,
        is_training=False,
        compute_language_model_loss=lambda labels, logits: logits.view(-1, 1).t() + 1.0,
        config=config,
    )
    saved = mtp.MTPLossAutoScaler.main_loss_backward_scale
    mtp.MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    try:
        out.sum().backward()
    finally:
        mtp.MTPLossAutoScaler.set_loss_scale(saved)
    return bool(hidden.grad[2].item() > 1.5)


def mtp_mask_weights(batches: list[dict], mtp_layers: int, group: Any) -> list[float]:
    """Per-micro-batch factors ``w_i`` for the loss mask handed to the model (see module doc).

    Args:
        batches: this rank's micro-batches of one global batch (each with ``loss_mask``).
        mtp_layers: MTP layers of the model (0: no MTP, all weights 1).
        group: the data(-and-context)-parallel group whose ranks hold the rest of the batch.
            Collective over it.
    """
    if not mtp_layers or not batches:
        return [1.0] * len(batches)
    if mtp_layers != 1:
        raise NotImplementedError("MTP loss weighting is implemented for one MTP layer (Ling's)")
    local_n = [float(b["loss_mask"].float().sum()) for b in batches]
    local_m = [float(mtp_token_mask(b["loss_mask"].float()).sum()) for b in batches]
    totals = torch.tensor([sum(local_n), sum(local_m)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals, group=group)
    n, m = float(totals[0]), float(totals[1])
    if m == 0:
        return [1.0] * len(batches)
    ratio = n / m
    if not megatron_rescales_mtp_per_microbatch():
        return [ratio] * len(batches)
    return [ratio * mi / ni if ni > 0 else 1.0 for ni, mi in zip(local_n, local_m, strict=True)]
