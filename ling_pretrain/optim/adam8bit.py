"""AdamW with both moments held in 8 bits, blockwise (Ling 2.0's "FP8 optimizer").

Ling trained with bitsandbytes' ``AdamW8bit``: each moment in blocks of 256 elements, one byte
per element (a dynamic code) and one fp32 absmax per block; tensors under 4096 elements keep
fp32 moments. This class does the same, in plain torch, so it runs wherever megatron-core
does (CPU or GPU) and sits inside megatron's optimizers as their inner torch optimizer: over
the fp32 main-parameter shards of the distributed optimizer (flat 1-D views of any length),
or over whole parameters without it.

Why not a library: torchao's ``AdamW8bit`` keeps fp32 moments for any tensor whose length is
not a multiple of 256, which is most distributed-optimizer shards; bitsandbytes' signed code
table has +1 but not -1, so decoding a block whose largest entry is negative and encoding it
again changes the block (7 of 16 random blocks did), and a resume from fp32 moments could not
be exact. See docs/fp8.md.

The update is torch's AdamW (decoupled weight decay, bias correction), computed in fp32 on
the decoded moments; only the stored moments are rounded. Memory: 2 bytes per element plus
8 bytes per 256 elements, 2.03 bytes per parameter instead of 8.

Checkpoints see fp32 moments under torch AdamW's names (``exp_avg``, ``exp_avg_sq``,
``step``): ``state_dict()`` decodes them, ``load_state_dict()`` encodes them, and
:func:`fp32_moments` shows them in ``state`` for megatron's distributed optimizer, which reads
and writes the inner optimizer's ``state`` directly. An 8-bit checkpoint therefore loads into
plain Adam and back, and because encoding decoded moments gives back the same bytes
(:mod:`ling_pretrain.optim.quant`), save -> load -> continue equals not stopping.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from ling_pretrain.optim.quant import BlockCodec

MIN_8BIT_NUMEL = 4096
"""Tensors (or distributed-optimizer shard pieces) smaller than this keep fp32 moments."""

FP32_KEYS = ("exp_avg", "exp_avg_sq")
"""torch AdamW's names of the moments, the names checkpoints hold."""


class Adam8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8-bit blockwise dynamic codes.

    Args:
        params: parameters or parameter groups (megatron passes groups).
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: added to the denominator, as in torch's AdamW.
        weight_decay: decoupled weight decay.
        min_8bit_numel: tensors with fewer elements keep fp32 moments.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_numel: int = MIN_8BIT_NUMEL,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.min_8bit_numel = min_8bit_numel
        self._signed = BlockCodec(signed=True)
        self._unsigned = BlockCodec(signed=False)
        self._hold_fp32 = False

    def quantized(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are stored in 8 bits."""
        return p.numel() >= self.min_8bit_numel

    def _codec(self, key: str) -> BlockCodec:
        return self._signed if key == "exp_avg" else self._unsigned

    def _fp32_state(self, p: torch.Tensor) -> dict:
        """``p``'s state with fp32 moments (new tensors when stored in 8 bits; zeros if none)."""
        state = self.state.get(p) or {}
        out = {"step": state.get("step", torch.zeros((), dtype=torch.float32))}
        for key in FP32_KEYS:
            if key in state:
                out[key] = state[key]
            elif key + "_codes" in state:
                codes, absmax = state[key + "_codes"], state[key + "_absmax"]
                out[key] = self._codec(key).decode(codes, absmax).view_as(p)
            else:
                out[key] = torch.zeros_like(p, dtype=torch.float32)
        return out

    def _in_storage_form(self, p: torch.Tensor, state: dict) -> bool:
        if "step" not in state:
            return False
        if self.quantized(p):
            return all(k + "_codes" in state and k not in state for k in FP32_KEYS)
        return all(k in state for k in FP32_KEYS)

    def _encode_state(self, p: torch.Tensor) -> None:
        """Replace fp32 moments in ``p``'s state by their 8-bit codes (when ``p`` is large)."""
        state = self.state[p]
        if not self.quantized(p):
            return
        for key in FP32_KEYS:
            if key in state:
                value = state.pop(key).detach().reshape(-1).to(torch.float32)
                codes, absmax = self._codec(key).encode(value)
                state[key + "_codes"], state[key + "_absmax"] = codes, absmax

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def expand_state(self) -> dict:
        """Show every parameter's state with fp32 moments; returns what it replaced.

        While expanded, ``state_dict``/``load_state_dict`` pass the fp32 state through and
        ``state`` may be written in place. :meth:`restore_state` puts the 8-bit state back
        untouched (after a save); :meth:`compress_state` encodes what was written (after a
        load).
        """
        replaced = {}
        for p in self._params():
            replaced[p] = self.state.get(p)
            self.state[p] = self._fp32_state(p)
        self._hold_fp32 = True
        return replaced

    def restore_state(self, replaced: dict) -> None:
        """Undo :meth:`expand_state` without re-encoding anything."""
        for p, state in replaced.items():
            if state is None:
                self.state.pop(p, None)
            else:
                self.state[p] = state
        self._hold_fp32 = False

    def compress_state(self) -> None:
        """Encode every fp32 moment of a large tensor into 8 bits."""
        for p in self._params():
            if p in self.state:
                self._encode_state(p)
        self._hold_fp32 = False

    def state_dict(self) -> dict:
        """torch AdamW's state-dict format: fp32 ``exp_avg``/``exp_avg_sq`` and ``step``."""
        if self._hold_fp32:
            return super().state_dict()
        replaced = self.expand_state()
        try:
            return super().state_dict()
        finally:
            self.restore_state(replaced)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load torch AdamW's format (from this class or plain Adam); moments are encoded."""
        super().load_state_dict(state_dict)
        if not self._hold_fp32:
            self.compress_state()

    def state_bytes(self) -> int:
        """Bytes held by the moments of all parameters (steps not counted)."""
        total = 0
        for state in self.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step; moments are decoded, updated in fp32, and encoded again."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            group_step = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Adam8bit does not support sparse gradients")
                state = self.state[p]
                if not self._in_storage_form(p, state):
                    # Fresh, or fp32 moments written by a load: bring them to storage form.
                    self.state[p] = state = self._fp32_state(p)
                    self._encode_state(p)
                step = float(state["step"]) + 1
                group_step = step
                state["step"] = torch.tensor(step, dtype=torch.float32)
                fp32 = self._fp32_state(p) if self.quantized(p) else state
                exp_avg, exp_avg_sq = fp32["exp_avg"], fp32["exp_avg_sq"]

                p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)

                if self.quantized(p):
                    for key, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                        codes, absmax = self._codec(key).encode(value.reshape(-1))
                        state[key + "_codes"], state[key + "_absmax"] = codes, absmax
            if group_step is not None:
                # Where megatron looks for the step of TE/apex Adam (kept per parameter too).
                group["step"] = int(group_step)
        return loss


def inner_optimizers(optimizer: Any) -> list:
    """The torch optimizers inside a megatron optimizer (chained or not), skipping empty ones."""
    chained = getattr(optimizer, "chained_optimizers", None)
    parts = chained if chained is not None else [optimizer]
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]


def use_adam8bit(optimizer: Any, min_8bit_numel: int = MIN_8BIT_NUMEL) -> None:
    """Replace the inner Adam of every part of a megatron optimizer by :class:`Adam8bit`.

    Called right after ``get_megatron_optimizer``, before any step: the inner optimizer then
    holds no state, and the param groups (megatron's fp32 main-parameter shards with their
    lr/wd multipliers) move over as they are, so the scheduler keeps driving them.
    """
    chained = getattr(optimizer, "chained_optimizers", None)
    for part in chained if chained is not None else [optimizer]:
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        if inner.state:
            raise RuntimeError("use_adam8bit must run before the optimizer's first step")
        d = inner.defaults
        # torch's constructor refuses non-leaf tensors, and the distributed optimizer's fp32
        # shards of fp32 parameters are views; megatron itself assigns its shard groups to
        # param_groups directly, so do the same over a placeholder.
        eight_bit = Adam8bit(
            [torch.zeros(1, requires_grad=True)],
            lr=d["lr"],
            betas=d["betas"],
            eps=d["eps"],
            weight_decay=d["weight_decay"],
            min_8bit_numel=min_8bit_numel,
        )
        for group in inner.param_groups:
            for key, value in eight_bit.defaults.items():
                group.setdefault(key, value)
        eight_bit.param_groups = inner.param_groups
        part.optimizer = eight_bit


@contextlib.contextmanager
def fp32_moments(optimizer: Any, loading: bool) -> Iterator[None]:
    """Show fp32 moments in the state of every :class:`Adam8bit` inside ``optimizer``.

    For a save (``loading=False``) the 8-bit state is put back untouched afterwards; for a
    load, the fp32 moments written by the load are encoded afterwards. Other inner
    optimizers are left alone.
    """
    parts = [o for o in inner_optimizers(optimizer) if isinstance(o, Adam8bit)]
    replaced = [o.expand_state() for o in parts]
    try:
        yield
    finally:
        for o, r in zip(parts, replaced, strict=True):
            if loading:
                o.compress_state()
            else:
                o.restore_state(r)
