"""FP8 linear layers emulated on any device: one autograd function, one rule per recipe.

Why this module exists
----------------------
A linear layer ``y = x @ w.T`` runs three GEMMs per training step, and under an FP8
recipe each one reads FP8 operands quantised along *its own* reduction dimension:

* forward (fprop), ``y = x @ w.T``, reduces over in-features;
* dgrad, ``dx = dy @ w``, reduces over out-features;
* wgrad, ``dw = dy.T @ x``, reduces over tokens.

:func:`emulated_gemm` is the single autograd function that runs all three. It is
parameterised by an :class:`FP8GemmEmulation`, a recipe's rule for the two operands of
each GEMM (``fprop_operands``, ``dgrad_operands``, ``wgrad_operands``, each returning the
pair ``(a, b)`` multiplied as ``a @ b.T``). The products are fp32; the output and input
gradient are cast to ``x``'s dtype, the weight gradient to the weight's; a bias is added
in fp32 and not quantised. The high-precision input and weight are saved for backward,
and each backward GEMM's operands are quantised from them: quantisation is
deterministic, so a scale computed again in backward equals the forward one. The FP8
rounding is therefore the recipe's; the only difference from the cuBLAS kernel is the
order of the fp32 additions (cuBLAS applies the scales per 128-wide slice of the
reduction inside its accumulator), which is noise at fp32 precision.

The recipes
-----------
* :class:`BlockwiseEmulation`, TE ``Float8BlockScaling`` (``FP8EmulationSpec``):
  fprop reads ``x`` in 1 x 128 tiles along hidden and ``w`` in 128 x 128 blocks; dgrad
  reads ``dy`` in 1 x 128 tiles along out-features and the *same* FP8 weight transposed
  (its square blocks transpose losslessly: Ling's "on-demand transpose"); wgrad reads
  ``dy.T`` and ``x.T`` in 1 x 128 tiles along tokens, quantised afresh from the high
  precision tensors, since a 1 x 128 tile does not survive transposition (TE's
  column-wise copies). Activations and weights use ``fmt``, gradients ``grad_fmt``:
  E4M3 for both ("E4M3 everywhere"), E5M2 gradients for a hybrid recipe.
  :func:`emulated_linear` is this recipe.
* :class:`TensorwiseEmulation`, TE ``Float8CurrentScaling`` with megatron's ``hybrid``
  format: one scale per tensor, ``fp8_max / amax`` without power-of-2 rounding, E4M3
  inputs and weights, E5M2 output gradients. A per-tensor scale survives transposition,
  so each operand is quantised once and the same values serve all three GEMMs.
* :class:`MXFP8Emulation`, TE ``MXFP8BlockScaling``: E4M3 for every operand, 1 x 32
  tiles along the reduction dimension of every GEMM (so, unlike blockwise, the weight is
  re-quantised from high precision in 32 x 1 tiles for dgrad), and E8M0 scales
  (:func:`mx_fake_quantize`).

Counters (:func:`fp8_emulation_stats`, :func:`fp8_emulation_totals`) count every
emulated GEMM of every recipe, so a caller can check that the emulated path really ran,
e.g. after wiring it into megatron's linear layers (``megatron_linear.py``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ling_pretrain.fp8.quantize import (
    Block,
    dequantize_blockwise,
    fake_quantize,
    get_fp8_format,
    quantize_blockwise,
    raise_if_nonfinite,
    transpose_blockwise,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BlockwiseEmulation",
    "FP8EmulatedLinear",
    "FP8EmulationSpec",
    "FP8EmulationStats",
    "FP8GemmEmulation",
    "MXFP8Emulation",
    "TensorwiseEmulation",
    "emulated_gemm",
    "emulated_linear",
    "fp8_emulation_stats",
    "fp8_emulation_totals",
    "mx_fake_quantize",
]

Operands = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FP8EmulationSpec:
    """How the operands of an emulated blockwise FP8 GEMM are quantised.

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
        for name in ("activation_block", "weight_block", "grad_block"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        get_fp8_format(self.fmt)
        get_fp8_format(self.grad_fmt)
        for name, block in (
            ("activation_block", self.activation_block),
            ("grad_block", self.grad_block),
        ):
            if len(block) != 2 or block[0] != 1 or block[1] < 1:
                raise ValueError(f"{name} must be a 1xK tile such as (1, 128), got {block!r}")
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


def _count(kind: str) -> None:
    with _STATS_LOCK:
        for stats in (_TOTALS, *_ACTIVE):
            setattr(stats, kind, getattr(stats, kind) + 1)


def fp8_emulation_totals() -> FP8EmulationStats:
    """Returns a snapshot of the GEMMs emulated since the process started."""
    with _STATS_LOCK:
        return dataclasses.replace(_TOTALS)


@contextlib.contextmanager
def fp8_emulation_stats() -> Iterator[FP8EmulationStats]:
    """Counts the GEMMs emulated, by any recipe and on any thread, while the context is open.

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


class FP8GemmEmulation(abc.ABC):
    """An FP8 recipe's rule for the operands of a linear layer's three GEMMs.

    Each method receives high-precision tensors (``dy2d`` in fp32, the others in their
    own dtype) and returns the fp32 values the FP8 GEMM reads, as a pair ``(a, b)``
    multiplied as ``a @ b.T``. Subclasses set ``name`` (the recipe, for logs).
    """

    name: str

    @abc.abstractmethod
    def fprop_operands(self, x2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """``y = x @ w.T``: ``(x, w)`` as the forward GEMM reads them."""

    @abc.abstractmethod
    def dgrad_operands(self, dy2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """``dx = dy @ w``: ``(dy, w.T)`` as the input-gradient GEMM reads them."""

    @abc.abstractmethod
    def wgrad_operands(self, dy2d: torch.Tensor, x2d: torch.Tensor) -> Operands:
        """``dw = dy.T @ x``: ``(dy.T, x.T)`` as the weight-gradient GEMM reads them."""

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``emulated_gemm(x, weight, bias, self)``."""
        return emulated_gemm(x, weight, bias, self)


def _gemm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in fp32 for fp32 ``a`` (M, K) and ``b`` (N, K)."""
    return a.contiguous() @ b.contiguous().t()


class _EmulatedFP8Gemm(torch.autograd.Function):
    """``y = x @ w.T (+ bias)`` whose three GEMMs read operands given by an emulation."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        emulation: FP8GemmEmulation,
    ) -> torch.Tensor:
        in_features = x.shape[-1]
        if weight.dim() != 2 or weight.shape[1] != in_features:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit input of shape "
                f"{tuple(x.shape)}; expected (out_features, {in_features})"
            )
        x2d = x.reshape(-1, in_features)
        y = _gemm_nt(*emulation.fprop_operands(x2d, weight))
        if bias is not None:
            y = y + bias.float()
        _count("forward")
        ctx.save_for_backward(x2d, weight)
        ctx.emulation = emulation
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x2d, weight = ctx.saved_tensors
        emulation: FP8GemmEmulation = ctx.emulation
        dy2d = dy.reshape(-1, dy.shape[-1]).float()
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _gemm_nt(*emulation.dgrad_operands(dy2d, weight))
            dx = dx.to(x2d.dtype).reshape(ctx.x_shape)
            _count("dgrad")
        if ctx.needs_input_grad[1]:
            dw = _gemm_nt(*emulation.wgrad_operands(dy2d, x2d)).to(weight.dtype)
            _count("wgrad")
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            dbias = dy2d.sum(dim=0).to(ctx.bias_dtype)
        return dx, dw, dbias, None


def emulated_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    emulation: FP8GemmEmulation,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose forward, dgrad and wgrad GEMMs read FP8 operands.

    Args:
        x: Input, ``(..., in_features)``.
        weight: ``(out_features, in_features)``.
        bias: Optional ``(out_features,)``, added in fp32, not quantised.
        emulation: The recipe's operand rule.

    Returns:
        ``(..., out_features)`` in ``x``'s dtype. Gradients: ``x``'s dtype for the input,
        the weight's for the weight, the bias's for the bias.

    Raises:
        ValueError: Mismatched shapes.
        FloatingPointError: An operand holds NaN/Inf (raised in backward for gradients),
            unless the emulation was told not to check.
    """
    return _EmulatedFP8Gemm.apply(x, weight, bias, emulation)


@dataclass(frozen=True)
class BlockwiseEmulation(FP8GemmEmulation):
    """TE ``Float8BlockScaling``: 1 x K tiles along each reduction dim, K x K weight blocks.

    Attributes:
        spec: Tiles, formats and scale rules; the recipe's defaults if not given.
        name: Recipe name, for logs.
    """

    spec: FP8EmulationSpec = field(default_factory=FP8EmulationSpec)
    name: str = "blockwise"

    def _opts(self) -> dict[str, Any]:
        s = self.spec
        return {
            "power_of_2_scales": s.power_of_2_scales,
            "amax_epsilon": s.amax_epsilon,
            "check_finite": s.check_finite,
        }

    def _weight_fp8(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_blockwise(
            weight, self.spec.weight_block, self.spec.fmt, name="weight", **self._opts()
        )

    def fprop_operands(self, x2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """Input in 1 x K tiles along in-features; weight in K x K blocks."""
        s = self.spec
        x_q = fake_quantize(x2d.float(), s.activation_block, s.fmt, name="input", **self._opts())
        return x_q, dequantize_blockwise(*self._weight_fp8(weight), s.weight_block)

    def dgrad_operands(self, dy2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """Output gradient in 1 x K tiles along out-features; the FP8 weight transposed.

        The weight's FP8 codes and scales are the forward's (same quantisation), read
        transposed without re-quantising: lossless for square blocks.
        """
        s = self.spec
        dy_q = fake_quantize(dy2d, s.grad_block, s.grad_fmt, name="output gradient", **self._opts())
        wt_q, wt_scale_inv = transpose_blockwise(*self._weight_fp8(weight), s.weight_block)
        return dy_q, dequantize_blockwise(wt_q, wt_scale_inv, s.weight_block)

    def wgrad_operands(self, dy2d: torch.Tensor, x2d: torch.Tensor) -> Operands:
        """``dy.T`` and ``x.T`` in 1 x K tiles along tokens, from high precision."""
        s = self.spec
        dyt_q = fake_quantize(
            dy2d.t(), s.grad_block, s.grad_fmt, name="transposed output gradient", **self._opts()
        )
        xt_q = fake_quantize(
            x2d.float().t(), s.activation_block, s.fmt, name="transposed input", **self._opts()
        )
        return dyt_q, xt_q


def _per_tensor_fake_quantize(x2d: torch.Tensor, fmt: str, name: str) -> torch.Tensor:
    """Current (per-tensor) scaling: one tile covering the whole matrix, exact scales."""
    if x2d.numel() == 0:
        return x2d.float()
    return fake_quantize(
        x2d.float(), (x2d.shape[0], x2d.shape[1]), fmt, power_of_2_scales=False, name=name
    )


@dataclass(frozen=True)
class TensorwiseEmulation(FP8GemmEmulation):
    """TE ``Float8CurrentScaling``: one exact (not power-of-2) scale per tensor.

    Attributes:
        fmt: Format of inputs and weights (E4M3).
        grad_fmt: Format of output gradients (E5M2 in megatron's ``hybrid``).
        name: Recipe name, for logs.
    """

    fmt: str = "e4m3"
    grad_fmt: str = "e5m2"
    name: str = "tensorwise"

    def __post_init__(self) -> None:
        get_fp8_format(self.fmt)
        get_fp8_format(self.grad_fmt)

    def fprop_operands(self, x2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """Input and weight, each with its own per-tensor scale."""
        return (
            _per_tensor_fake_quantize(x2d, self.fmt, "input"),
            _per_tensor_fake_quantize(weight, self.fmt, "weight"),
        )

    def dgrad_operands(self, dy2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """Output gradient, and the forward's FP8 weight read transposed."""
        w_q = _per_tensor_fake_quantize(weight, self.fmt, "weight")
        return _per_tensor_fake_quantize(dy2d, self.grad_fmt, "output gradient"), w_q.t()

    def wgrad_operands(self, dy2d: torch.Tensor, x2d: torch.Tensor) -> Operands:
        """The same FP8 output gradient and FP8 input as dgrad and forward, transposed."""
        dy_q = _per_tensor_fake_quantize(dy2d, self.grad_fmt, "output gradient")
        return dy_q.t(), _per_tensor_fake_quantize(x2d, self.fmt, "input").t()


# The E8M0 exponent field of an fp32 number and the rule TE's ``float_to_e8m0`` applies.
_FP32_MANTISSA_BITS = 23
_FP32_MANTISSA_MASK = 0x7FFFFF
_E8M0_MAX_FINITE = 0xFE
_E8M0_BIAS = 127


def mx_fake_quantize(
    x2d: torch.Tensor, block: int = 32, fmt: str = "e4m3", *, name: str = "tensor"
) -> torch.Tensor:
    """MXFP8 quantise-dequantise of a matrix in ``1 x block`` tiles along its last dim.

    Per tile, ``v = amax * fl32(1 / fp8_max)`` is computed in fp32 and its exponent field
    is rounded up when any mantissa bit is set (not past 254, and not for values at or
    below 2^-127), giving the biased E8M0 exponent ``e``; elements are multiplied by
    ``2^(127 - e)`` (by 1 when ``e == 0``), cast to FP8 with saturation and multiplied
    back by ``2^(e - 127)``. An all-zero tile has ``e == 0`` and stays zero.

    Args:
        x2d: 2-D floating-point tensor, finite.
        block: Tile length (32 for MXFP8).
        fmt: ``"e4m3"`` or ``"e5m2"``.
        name: What ``x2d`` is, for error messages.

    Returns:
        fp32 tensor of ``x2d``'s shape: the values the FP8 GEMM reads.

    Raises:
        ValueError: ``x2d`` is not 2-D or ``block < 1``.
        FloatingPointError: ``x2d`` holds NaN or Inf.
    """
    fp8 = get_fp8_format(fmt)
    if x2d.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x2d.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    raise_if_nonfinite(x2d, name=name)
    rows, cols = x2d.shape
    n_tiles = -(-cols // block)
    tiles = F.pad(x2d.float(), (0, n_tiles * block - cols)).reshape(rows, n_tiles, block)
    amax = tiles.abs().amax(dim=-1)
    # TE multiplies by the fp32 reciprocal of fp8_max (a compile-time float constant).
    rcp = torch.tensor(1.0 / fp8.max, dtype=torch.float32)
    bits = (amax * rcp).view(torch.int32)
    exponent = bits >> _FP32_MANTISSA_BITS
    mantissa = bits & _FP32_MANTISSA_MASK
    round_up = (
        (mantissa > 0)
        & (exponent != _E8M0_MAX_FINITE)
        & ~((exponent == 0) & (mantissa <= 0x400000))
    )
    e = exponent + round_up.to(torch.int32)
    # 2^(127 - e) built from its fp32 bits, as TE does; e == 0 quantises with scale 1.
    quant_scale = ((2 * _E8M0_BIAS - e) << _FP32_MANTISSA_BITS).view(torch.float32)
    quant_scale = torch.where(e == 0, torch.ones_like(quant_scale), quant_scale)
    q = (tiles * quant_scale[..., None]).clamp(-fp8.max, fp8.max).to(fp8.dtype)
    dequant_scale = torch.pow(2.0, e.double() - _E8M0_BIAS).float()
    out = q.float() * dequant_scale[..., None]
    return out.reshape(rows, n_tiles * block)[:, :cols]


@dataclass(frozen=True)
class MXFP8Emulation(FP8GemmEmulation):
    """TE ``MXFP8BlockScaling``: 1 x 32 tiles along every GEMM's reduction dim, E8M0 scales.

    Attributes:
        block: Tile length.
        fmt: Format of every operand (E4M3).
        name: Recipe name, for logs.
    """

    block: int = 32
    fmt: str = "e4m3"
    name: str = "mxfp8"

    def __post_init__(self) -> None:
        get_fp8_format(self.fmt)
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")

    def fprop_operands(self, x2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """Input and weight, both tiled along in-features."""
        return (
            mx_fake_quantize(x2d, self.block, self.fmt, name="input"),
            mx_fake_quantize(weight, self.block, self.fmt, name="weight"),
        )

    def dgrad_operands(self, dy2d: torch.Tensor, weight: torch.Tensor) -> Operands:
        """Output gradient and the weight's column-wise copy, both tiled along out-features."""
        return (
            mx_fake_quantize(dy2d, self.block, self.fmt, name="output gradient"),
            mx_fake_quantize(weight.t(), self.block, self.fmt, name="transposed weight"),
        )

    def wgrad_operands(self, dy2d: torch.Tensor, x2d: torch.Tensor) -> Operands:
        """Column-wise copies of output gradient and input, both tiled along tokens."""
        return (
            mx_fake_quantize(dy2d.t(), self.block, self.fmt, name="transposed output gradient"),
            mx_fake_quantize(x2d.t(), self.block, self.fmt, name="transposed input"),
        )


def emulated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    spec: FP8EmulationSpec | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the FP8 rounding of TE's blockwise recipe.

    ``emulated_gemm`` with ``BlockwiseEmulation(spec)``: all three GEMMs (forward, dgrad,
    wgrad) see operands quantised and dequantised with the tiles of ``spec`` along their
    reduction dimension, and multiply in fp32; results are cast to ``x``'s (output,
    input gradient) and ``weight``'s (weight gradient) dtypes. Bias, if any, is added in
    fp32 and is not quantised.

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
    return emulated_gemm(x, weight, bias, BlockwiseEmulation(spec or FP8EmulationSpec()))


class FP8EmulatedLinear(torch.nn.Linear):
    """``torch.nn.Linear`` whose GEMMs go through ``emulated_linear``.

    A stand-alone helper for tests and small experiments; megatron's parallel linear
    layers are wired to ``emulated_gemm`` in ``megatron_linear.py``.

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
