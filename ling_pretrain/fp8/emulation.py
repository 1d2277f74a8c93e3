"""An FP8 linear layer emulated on any device, tiled like TE's blockwise recipe.

Why this module exists
----------------------
A linear layer ``y = x @ w.T`` runs three GEMMs per training step, and in the blockwise
FP8 recipe each one reads FP8 operands quantised along *its own* reduction dimension:

* forward, ``y = x @ w.T`` (reduce over hidden): ``x`` in 1 x 128 tiles along hidden,
  ``w`` in 128 x 128 blocks.
* dgrad, ``dx = dy @ w`` (reduce over out-features): ``dy`` in 1 x 128 tiles along
  out-features, and ``w`` read transposed. Its 128 x 128 blocks transpose losslessly, so
  the same FP8 weight serves (Ling's "on-demand transpose").
* wgrad, ``dw = dy.T @ x`` (reduce over tokens): ``dy.T`` and ``x.T`` each in 1 x 128
  tiles along tokens. A 1 x 128 tile does not survive transposition, so both are
  quantised afresh from the high-precision tensors, as TE's column-wise copies are.

``emulated_linear`` reproduces exactly those operand values with
``ling_pretrain.fp8.quantize`` and multiplies them in fp32 before casting to the input
dtype. The FP8 rounding is therefore the recipe's; the only difference from the cuBLAS
kernel is the order of the fp32 additions (cuBLAS applies the scales per 128-wide slice
of the reduction inside its accumulator), which is noise at fp32 precision.

Activations and weights use ``fmt``, gradients ``grad_fmt``: E4M3 for both in
``Float8BlockScaling`` ("E4M3 everywhere"), E5M2 gradients for a hybrid recipe.

Counters (``fp8_emulation_stats``) let a caller check that the emulated path really ran,
e.g. after wiring it into megatron's linear layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ling_pretrain.fp8.quantize import (
    Block,
    dequantize_blockwise,
    fake_quantize,
    get_fp8_format,
    quantize_blockwise,
    transpose_blockwise,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FP8EmulatedLinear",
    "FP8EmulationSpec",
    "FP8EmulationStats",
    "emulated_linear",
    "fp8_emulation_stats",
    "fp8_emulation_totals",
]


@dataclass(frozen=True)
class FP8EmulationSpec:
    """How the operands of an emulated FP8 GEMM are quantised.

    The defaults are TransformerEngine's ``Float8BlockScaling``.

    Attributes:
        activation_block: Tile of inputs, ``(1, K)``: along each GEMM's reduction dim.
        weight_block: Square block of weights, ``(K, K)``, so the weight transposes
            losslessly for dgrad.
        grad_block: Tile of output gradients, ``(1, K)``.
        fmt: FP8 format of activations and weights, ``"e4m3"`` or ``"e5m2"``.
        grad_fmt: FP8 format of output gradients (``"e5m2"`` for a hybrid recipe).
        power_of_2_scales: Round scales down to powers of two.
        amax_epsilon: Lower bound on each tile's amax.
        check_finite: Raise ``FloatingPointError`` on NaN/Inf in any operand.
    """

    activation_block: Block = (1, 128)
    weight_block: Block = (128, 128)
    grad_block: Block = (1, 128)
    fmt: str = "e4m3"
    grad_fmt: str = "e4m3"
    power_of_2_scales: bool = True
    amax_epsilon: float = 0.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        # Blocks may arrive as lists (e.g. from a YAML config); store hashable tuples.
        for field in ("activation_block", "weight_block", "grad_block"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        get_fp8_format(self.fmt)
        get_fp8_format(self.grad_fmt)
        for field, block in (
            ("activation_block", self.activation_block),
            ("grad_block", self.grad_block),
        ):
            if len(block) != 2 or block[0] != 1 or block[1] < 1:
                raise ValueError(f"{field} must be a 1xK tile such as (1, 128), got {block!r}")
        wb = self.weight_block
        if len(wb) != 2 or wb[0] != wb[1] or wb[0] < 1:
            raise ValueError(
                f"weight_block must be a square KxK block such as (128, 128) so that "
                f"dgrad can reuse it transposed, got {wb!r}"
            )
        if self.amax_epsilon < 0:
            raise ValueError(f"amax_epsilon must be >= 0, got {self.amax_epsilon}")


@dataclass
class FP8EmulationStats:
    """Counts of emulated GEMMs.

    Attributes:
        forward: Forward GEMMs (``x @ w.T``).
        dgrad: Input-gradient GEMMs (``dy @ w``).
        wgrad: Weight-gradient GEMMs (``dy.T @ x``).
    """

    forward: int = 0
    dgrad: int = 0
    wgrad: int = 0

    @property
    def total(self) -> int:
        """All emulated GEMMs."""
        return self.forward + self.dgrad + self.wgrad


# Backward can run on autograd worker threads, so the trackers are global (not
# thread-local) and every update holds the lock.
_STATS_LOCK = threading.Lock()
_TOTALS = FP8EmulationStats()
_ACTIVE: list[FP8EmulationStats] = []


def _record(kind: str) -> None:
    with _STATS_LOCK:
        for stats in (_TOTALS, *_ACTIVE):
            setattr(stats, kind, getattr(stats, kind) + 1)


def fp8_emulation_totals() -> FP8EmulationStats:
    """Returns a snapshot of the GEMMs emulated since the process started."""
    with _STATS_LOCK:
        return dataclasses.replace(_TOTALS)


@contextlib.contextmanager
def fp8_emulation_stats() -> Iterator[FP8EmulationStats]:
    """Counts the GEMMs emulated, on any thread, while the context is open.

    Example::

        with fp8_emulation_stats() as stats:
            loss = model(batch).sum()
            loss.backward()
        assert stats.forward > 0 and stats.wgrad > 0

    Yields:
        A live ``FP8EmulationStats``; it stops changing when the context exits.
    """
    stats = FP8EmulationStats()
    with _STATS_LOCK:
        _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        with _STATS_LOCK:
            _ACTIVE[:] = [s for s in _ACTIVE if s is not stats]


def _gemm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in fp32 for contiguous fp32 ``a`` (M, K) and ``b`` (N, K)."""
    return a.contiguous() @ b.contiguous().t()


class _EmulatedFP8Linear(torch.autograd.Function):
    """``y = x @ w.T (+ bias)`` with each GEMM's operands quantised as TE does."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: FP8EmulationSpec,
    ) -> torch.Tensor:
        in_features = x.shape[-1]
        if weight.dim() != 2 or weight.shape[1] != in_features:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit input of shape "
                f"{tuple(x.shape)}; expected (out_features, {in_features})"
            )
        opts = {
            "power_of_2_scales": spec.power_of_2_scales,
            "amax_epsilon": spec.amax_epsilon,
            "check_finite": spec.check_finite,
        }
        x2d = x.reshape(-1, in_features)
        x_q = fake_quantize(x2d.float(), spec.activation_block, spec.fmt, name="input", **opts)
        w_q, w_scale_inv = quantize_blockwise(
            weight, spec.weight_block, spec.fmt, name="weight", **opts
        )
        w_deq = dequantize_blockwise(w_q, w_scale_inv, spec.weight_block)
        y = _gemm_nt(x_q, w_deq)
        if bias is not None:
            y = y + bias.float()
        _record("forward")

        # Like TE, keep the FP8 weight (not a transposed copy) and the high-precision
        # input, from which wgrad's column-wise tiles are quantised.
        ctx.save_for_backward(x2d, w_q, w_scale_inv)
        ctx.spec = spec
        ctx.opts = opts
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x2d, w_q, w_scale_inv = ctx.saved_tensors
        spec: FP8EmulationSpec = ctx.spec
        opts = ctx.opts
        dy2d = dy.reshape(-1, dy.shape[-1]).float()
        dx = dw = dbias = None

        if ctx.needs_input_grad[0]:
            dy_q = fake_quantize(
                dy2d, spec.grad_block, spec.grad_fmt, name="output gradient", **opts
            )
            wt_q, wt_scale_inv = transpose_blockwise(w_q, w_scale_inv, spec.weight_block)
            wt_deq = dequantize_blockwise(wt_q, wt_scale_inv, spec.weight_block)
            dx = _gemm_nt(dy_q, wt_deq).to(x2d.dtype).reshape(ctx.x_shape)
            _record("dgrad")

        if ctx.needs_input_grad[1]:
            dyt_q = fake_quantize(
                dy2d.t(),
                spec.grad_block,
                spec.grad_fmt,
                name="transposed output gradient",
                **opts,
            )
            xt_q = fake_quantize(
                x2d.float().t(),
                spec.activation_block,
                spec.fmt,
                name="transposed input",
                **opts,
            )
            dw = _gemm_nt(dyt_q, xt_q).to(ctx.weight_dtype)
            _record("wgrad")

        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = dy2d.sum(dim=0).to(ctx.bias_dtype)
        return dx, dw, dbias, None


def emulated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    spec: FP8EmulationSpec | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the FP8 rounding of TE's blockwise recipe.

    All three GEMMs (forward, dgrad, wgrad) see operands quantised and dequantised with
    the tiles of ``spec`` along their reduction dimension, and multiply in fp32; results
    are cast to ``x``'s (output, input gradient) and ``weight``'s (weight gradient)
    dtypes. Bias, if any, is added in fp32 and is not quantised.

    Args:
        x: Input, ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        spec: Quantisation settings; ``FP8EmulationSpec()`` (the blockwise recipe) if
            None.
        bias: Optional ``(out_features,)``.

    Returns:
        ``(..., out_features)`` in ``x``'s dtype.

    Raises:
        ValueError: Mismatched shapes.
        FloatingPointError: An operand holds NaN/Inf and ``spec.check_finite`` is set
            (raised in backward for gradients).
    """
    return _EmulatedFP8Linear.apply(x, weight, bias, spec or FP8EmulationSpec())


class FP8EmulatedLinear(torch.nn.Linear):
    """``torch.nn.Linear`` whose GEMMs go through ``emulated_linear``.

    A stand-alone helper for tests and small experiments; megatron's parallel linear
    layers are wired to ``emulated_linear`` elsewhere.

    Args:
        in_features: Input size.
        out_features: Output size.
        bias: Whether to learn a bias (Ling has none, hence False by default).
        spec: Quantisation settings; the blockwise recipe if None.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        spec: FP8EmulationSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = spec or FP8EmulationSpec()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the emulated FP8 linear map."""
        return emulated_linear(x, self.weight, self.spec, self.bias)
