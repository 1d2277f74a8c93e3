"""Bad steps: skip a step whose loss or gradient norm is not finite, or whose loss spikes, and
stop the run when bad steps persist.

Why it works this way:

* **What is bad.** A non-finite loss, a non-finite gradient norm, or a loss spike: a loss
  above ``mean + trainer.loss_spike_sigma x std`` of the last ``trainer.loss_spike_window``
  good steps (sample standard deviation), looked for once ``trainer.loss_spike_warmup`` good
  steps are in the window. OLMo-core skips steps the same way; PaLM rolled back and skipped
  batches around its spikes. Only good steps enter the window, so a spike does not raise the
  bar for the next one.
* **Nothing changes.** The decision needs the step's loss (known after forward/backward)
  and its gradient norm (known once megatron has reduced the gradients and copied them to
  its fp32 main gradients). megatron's optimizer step starts with ``prepare_grads()``; when
  that reports non-finite gradients (the path of its fp16 loss scaler), the step returns
  before clipping, updating or copying anything. :func:`step_unless_bad` decides right
  there, so a skipped step leaves the weights, the fp32 master weights, both moments and
  the step counters as they were, and the LR schedule is not stepped. The one change made
  before the decision, megatron's expert-bias update inside ``finalize_model_grads``, is
  undone from a copy taken just before it (:mod:`ling_pretrain.train.moe`). The batch stays
  consumed: the data position moves on.
* **Every rank agrees.** Loss and gradient norm are global values already; the verdict is
  all-reduced as well (MAX), so all ranks skip together even when one rank alone saw a NaN.
* **megatron's own check** (``check_for_nan_in_grad`` of its DDP) raises on the first
  non-finite gradient, so it is off (:mod:`ling_pretrain.train.ddp`); this check replaces
  it at the same cost, one gradient-norm pass per step.
* **Exact resume.** The window and the count of bad steps in a row are part of the
  checkpoint's train state, so a resumed run decides exactly as the uninterrupted one.
* **Persistent faults.** After ``trainer.max_consecutive_bad_steps`` bad steps in a row the
  run stops with :data:`EXIT_BAD_STEPS` and saves nothing: its weights are those of the last
  good step, and the message names the newest intact checkpoint to go back to.

Fault injection for drills and tests (``trainer.inject_nan_grad_steps``,
``trainer.inject_loss_spike_steps``) goes through the loss function
(:func:`inject`), so the rest of the step runs as it would on a real fault.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3
"""Exit code of a run stopped after ``trainer.max_consecutive_bad_steps`` bad steps in a row."""

LOSS_SPIKE, NON_FINITE_GRAD, NON_FINITE_LOSS = 1, 2, 3
"""Verdict codes, ordered by severity (ranks agree on the largest)."""

INJECTED_SPIKE_FACTOR = 100.0
"""``trainer.inject_loss_spike_steps`` multiply the loss (and so the gradients) by this."""


class TooManyBadSteps(Exception):
    """Raised on every rank when bad steps persist; the process exits with :attr:`exit_code`."""

    exit_code = EXIT_BAD_STEPS


class BadStepPolicy:
    """The spike statistics, the verdicts and the count of bad steps in a row.

    Args:
        trainer: the ``trainer`` config group.
        state: what :meth:`state_dict` returned (from a checkpoint), or None for a new run.
    """

    def __init__(self, trainer: Any, state: dict | None = None):
        state = state or {}
        self.sigma = trainer.loss_spike_sigma
        self.warmup = int(trainer.loss_spike_warmup)
        self.limit = int(trainer.max_consecutive_bad_steps)
        self.losses: deque[float] = deque(
            (float(x) for x in state.get("recent_losses", [])),
            maxlen=int(trainer.loss_spike_window),
        )
        self.in_a_row = int(state.get("in_a_row", 0))
        self.total = int(state.get("total", 0))
        self.last_reason: str | None = state.get("last_reason")

    def statistics(self) -> tuple[float, float] | None:
        """Mean and sample standard deviation of the window, or None before the warm-up."""
        n = len(self.losses)
        if n < max(self.warmup, 2):
            return None
        mean = math.fsum(self.losses) / n
        var = math.fsum((x - mean) ** 2 for x in self.losses) / (n - 1)
        return mean, math.sqrt(var)

    def threshold(self) -> float | None:
        """The loss above which a step is a spike, or None (off, or still warming up)."""
        if self.sigma is None:
            return None
        stats = self.statistics()
        return None if stats is None else stats[0] + self.sigma * stats[1]

    def classify(self, loss: float, grad_norm: float) -> int:
        """This rank's verdict code for a step: 0 (good) or one of the bad codes."""
        if not math.isfinite(loss):
            return NON_FINITE_LOSS
        if not math.isfinite(grad_norm):
            return NON_FINITE_GRAD
        limit = self.threshold()
        if limit is not None and loss > limit:
            return LOSS_SPIKE
        return 0

    def describe(self, code: int, loss: float, grad_norm: float) -> str:
        """The reason recorded for a bad step (``metrics.jsonl``, the log)."""
        if code == NON_FINITE_LOSS:
            return f"non-finite loss ({loss})"
        if code == NON_FINITE_GRAD:
            return f"non-finite gradient norm ({grad_norm})"
        mean, std = self.statistics()
        return (
            f"loss spike: {loss:.4f} > {mean + self.sigma * std:.4f} (mean {mean:.4f} + "
            f"{self.sigma:g} x std {std:.4f} of the last {len(self.losses)} good steps)"
        )

    def update(self, loss: float, reason: str | None) -> None:
        """Record a finished step: a good one joins the window, a bad one the count."""
        if reason is None:
            self.losses.append(float(loss))
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.total += 1
            self.last_reason = reason

    def must_stop(self) -> bool:
        """Whether the bad steps in a row have reached ``trainer.max_consecutive_bad_steps``."""
        return self.in_a_row >= self.limit

    def state_dict(self) -> dict:
        """JSON-able state for the checkpoint (floats round-trip exactly)."""
        return {
            "recent_losses": list(self.losses),
            "in_a_row": self.in_a_row,
            "total": self.total,
            "last_reason": self.last_reason,
        }


def verdict(policy: BadStepPolicy, loss: float, grad_norm: float, device: Any) -> str | None:
    """The reason to skip this step, agreed by every rank (collective), or None to step."""
    code = torch.tensor([policy.classify(loss, grad_norm)], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
    code = int(code.item())
    return policy.describe(code, loss, grad_norm) if code else None


FP16_OVERFLOW = "fp16 loss-scale overflow (the loss scale is lowered)"
"""Reason of a step megatron's fp16 loss scaler skipped itself (not counted as bad)."""


def step_unless_bad(
    optimizer: Any, decide: Callable[[float], str | None]
) -> tuple[bool, float, str | None]:
    """Run megatron's ``optimizer.step()`` unless ``decide(grad_norm)`` names a reason not to.

    Returns (stepped, gradient norm before clipping, reason for skipping or None).
    ``decide`` runs on every rank once megatron's main gradients are ready and before
    anything is changed (see the module docstring).
    """
    seen: dict = {"grad_norm": math.nan, "reason": None}
    prepare = optimizer.prepare_grads

    def prepare_grads() -> bool:
        if prepare():  # fp16: the loss scaler found inf/nan and has lowered its scale
            seen["reason"] = FP16_OVERFLOW
            return True
        seen["grad_norm"] = float(optimizer.get_grad_norm())
        seen["reason"] = decide(seen["grad_norm"])
        return seen["reason"] is not None

    # megatron's step() calls self.prepare_grads() first, for one optimizer or a chain.
    optimizer.prepare_grads = prepare_grads
    try:
        stepped, _, _ = optimizer.step()
    finally:
        del optimizer.prepare_grads
    return bool(stepped), seen["grad_norm"], seen["reason"]


def inject(trainer: Any, step: int, is_last_dp_rank: bool) -> str | None:
    """The fault ``trainer.inject_*_steps`` ask for at ``step`` on this rank, if any."""
    if step in (trainer.inject_loss_spike_steps or ()):
        return "spike"
    if is_last_dp_rank and step in (trainer.inject_nan_grad_steps or ()):
        return "nan_grad"
    return None


class _NanGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back is NaN (a fault in backward only)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan


def apply_fault(loss: torch.Tensor, fault: str | None) -> torch.Tensor:
    """The micro-batch loss with an injected fault (see :func:`inject`)."""
    if fault == "spike":
        return loss * INJECTED_SPIKE_FACTOR
    if fault == "nan_grad":
        return _NanGradient.apply(loss)
    return loss


def give_up(step: int, max_steps: int, policy: BadStepPolicy, latest: Any, stop: Any) -> NoReturn:
    """Log why the run stops, write the status file (collective), raise TooManyBadSteps."""
    if latest is None:
        where = (
            "no checkpoint has been saved yet, so a restart begins from the initialisation again"
        )
    else:
        where = f"the newest intact checkpoint is {latest}; a restart resumes from it"
    message = (
        f"step {step}: {policy.in_a_row} bad steps in a row "
        f"(trainer.max_consecutive_bad_steps={policy.limit}), the last one: {policy.last_reason}. "
        f"Stopping without saving ({where}, and replays the same batches). Look at the data "
        "and the learning rate around this step; to pass a transient fault, raise "
        "trainer.max_consecutive_bad_steps (or trainer.loss_spike_sigma for spikes)."
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.error(message)
    checkpoint = str(latest) if latest else None
    stop.finish(step, max_steps, checkpoint, failure=(EXIT_BAD_STEPS, "bad steps"))
    raise TooManyBadSteps(message)
