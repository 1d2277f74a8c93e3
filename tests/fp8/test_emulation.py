"""Emulated FP8 linear: each GEMM sees operands tiled along its own reduction dim."""

from __future__ import annotations

import threading

import pytest
import torch

from ling_pretrain.fp8.emulation import (
    FP8EmulatedLinear,
    FP8EmulationSpec,
    FP8GemmEmulation,
    emulated_gemm,
    emulated_linear,
    fp8_emulation_stats,
    fp8_emulation_totals,
)
from ling_pretrain.fp8.quantize import fake_quantize

ROW = (1, 128)
BLOCK = (128, 128)

# 2 x 100 = 200 tokens, 320 in-features, 160 out-features: none a multiple of 128.
BATCH, SEQ, IN, OUT = 2, 100, 320, 160


def _skewed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Data whose magnitudes vary by row and by column over five decades each.

    Power-of-2 scaling rounds normal-range values identically under any tile scale, so
    tilings only disagree where an element is tiny next to its tile's amax; skewing both
    axes makes that common, so a wrongly oriented tile changes the result.
    """
    gen = torch.Generator().manual_seed(seed)
    row_exp = torch.empty(rows, 1).uniform_(-2.5, 2.5, generator=gen)
    col_exp = torch.empty(1, cols).uniform_(-2.5, 2.5, generator=gen)
    return torch.randn(rows, cols, generator=gen) * torch.pow(10.0, row_exp + col_exp)


def _operands(
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _skewed(BATCH * SEQ, IN, seed=0).reshape(BATCH, SEQ, IN).to(dtype)
    w = (_skewed(OUT, IN, seed=1) * 1e-2).to(dtype)
    dy = _skewed(BATCH * SEQ, OUT, seed=2).reshape(BATCH, SEQ, OUT).to(dtype)
    return x, w, dy


def _run(
    x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, spec: FP8EmulationSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = emulated_linear(x, w, spec)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _frac_differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_manual_quantized_matmul(dtype: torch.dtype) -> None:
    x, w, _ = _operands(dtype)
    y = emulated_linear(x, w)
    assert y.dtype == dtype and y.shape == (BATCH, SEQ, OUT)

    x_q = fake_quantize(x.reshape(-1, IN).float(), ROW)
    w_q = fake_quantize(w.float(), BLOCK)
    expected = (x_q @ w_q.t()).to(dtype).reshape(BATCH, SEQ, OUT)
    assert torch.equal(y, expected)

    # The tiling matters: 1x128 along tokens instead of hidden is a different result.
    x_wrong = fake_quantize(x.reshape(-1, IN).float().t().contiguous(), ROW).t()
    y_wrong = (x_wrong @ w_q.t()).to(dtype).reshape(BATCH, SEQ, OUT)
    assert _frac_differing(y_wrong, expected) > 0.2


@pytest.mark.parametrize("grad_fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_equals_manual_quantized_matmuls(dtype: torch.dtype, grad_fmt: str) -> None:
    x, w, dy = _operands(dtype)
    _, dx, dw = _run(x, w, dy, FP8EmulationSpec(grad_fmt=grad_fmt))
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dw.dtype == dtype and dw.shape == w.shape

    x2d, dy2d = x.reshape(-1, IN).float(), dy.reshape(-1, OUT).float()
    # dgrad = dy @ w: dy tiled along out-features, w in the same (transposed) blocks.
    dy_rows = fake_quantize(dy2d, ROW, grad_fmt)
    w_t = fake_quantize(w.float(), BLOCK).t().contiguous()
    dx_ref = (dy_rows @ w_t.t()).to(dtype).reshape(x.shape)
    assert torch.equal(dx, dx_ref)
    # wgrad = dy.T @ x: both tiled along tokens, quantised from the originals.
    dy_t = fake_quantize(dy2d.t().contiguous(), ROW, grad_fmt)
    x_t = fake_quantize(x2d.t().contiguous(), ROW)
    dw_ref = (dy_t @ x_t.t()).to(dtype)
    assert torch.equal(dw, dw_ref)

    # Reusing the forward's row-wise tiles for wgrad would give something else.
    dw_row_tiles = (dy_rows.t() @ fake_quantize(x2d, ROW)).to(dtype)
    assert _frac_differing(dw_row_tiles, dw_ref) > 0.2
    # ... as would tiling dy along tokens for dgrad. (Not visible with E5M2: its range
    # covers the five decades within a tile of dy without reaching subnormals.)
    dx_col_tiles = (dy_t.t() @ w_t.t()).to(dtype).reshape(x.shape)
    if grad_fmt == "e4m3":
        assert _frac_differing(dx_col_tiles, dx_ref) > 0.2


def test_grad_format_is_applied_to_gradients_only() -> None:
    x, w, dy = _operands(torch.float32)
    y4, dx4, dw4 = _run(x, w, dy, FP8EmulationSpec())
    y5, dx5, dw5 = _run(x, w, dy, FP8EmulationSpec(grad_fmt="e5m2"))
    assert torch.equal(y4, y5)
    exact_dx = dy.reshape(-1, OUT) @ w
    exact_dw = dy.reshape(-1, OUT).t() @ x.reshape(-1, IN)
    # E5M2 has one mantissa bit less: its gradients are clearly less accurate.
    assert _rel(dx5.reshape(-1, IN), exact_dx) > 1.5 * _rel(dx4.reshape(-1, IN), exact_dx)
    assert _rel(dw5, exact_dw) > 1.5 * _rel(dw4, exact_dw)


def test_emulation_is_close_to_but_not_equal_to_full_precision() -> None:
    x, w, dy = _operands(torch.float32)
    y, dx, dw = _run(x, w, dy, FP8EmulationSpec())
    x2d, dy2d = x.reshape(-1, IN), dy.reshape(-1, OUT)
    for got, exact in [
        (y.reshape(-1, OUT), x2d @ w.t()),
        (dx.reshape(-1, IN), dy2d @ w),
        (dw, dy2d.t() @ x2d),
    ]:
        rel = _rel(got, exact)
        assert 3e-3 < rel < 5e-2


def test_bias_is_added_in_full_precision_and_gets_its_gradient() -> None:
    x, w, dy = _operands(torch.float32)
    bias = torch.randn(OUT, requires_grad=True)
    y = emulated_linear(x, w, bias=bias)
    assert torch.equal(y, emulated_linear(x, w) + bias.detach())
    y.backward(dy)
    torch.testing.assert_close(bias.grad, dy.reshape(-1, OUT).sum(0))


def test_stats_count_the_gemms_that_ran() -> None:
    x, w, dy = _operands(torch.float32)
    before = fp8_emulation_totals()
    with fp8_emulation_stats() as outer:
        _run(x, w, dy, FP8EmulationSpec())
        with fp8_emulation_stats() as inner:
            # Input without grad (first layer): no dgrad GEMM.
            y = emulated_linear(x, w.clone().requires_grad_())
            y.backward(dy)
        with torch.no_grad():
            emulated_linear(x, w)
    emulated_linear(x, w)  # outside every context
    after = fp8_emulation_totals()

    assert (inner.forward, inner.dgrad, inner.wgrad) == (1, 0, 1)
    assert (outer.forward, outer.dgrad, outer.wgrad) == (3, 1, 2)
    assert outer.total == 6
    assert after.forward - before.forward == 4
    assert after.wgrad - before.wgrad == 2


def test_stats_are_consistent_across_threads() -> None:
    x = torch.randn(8, 128)
    w = torch.randn(128, 128)

    def work() -> None:
        for _ in range(25):
            emulated_linear(x, w)

    with fp8_emulation_stats() as stats:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert stats.forward == 100


def test_nonfinite_operands_raise_unless_disabled() -> None:
    x, w, dy = _operands(torch.float32)
    bad_w = w.clone()
    bad_w[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weight with shape \(160, 320\)"):
        emulated_linear(x, bad_w)

    bad_dy = dy.clone()
    bad_dy[0, 1, 2] = float("inf")
    x_req = x.clone().requires_grad_()
    y = emulated_linear(x_req, w)
    with pytest.raises(FloatingPointError, match=r"output gradient.*1 Inf"):
        y.backward(bad_dy)

    x_req = x.clone().requires_grad_()
    y = emulated_linear(x_req, w, FP8EmulationSpec(check_finite=False))
    y.backward(bad_dy)
    assert torch.isfinite(x_req.grad).all()


def test_zero_tokens_are_handled() -> None:
    # An expert that received no tokens still runs its (empty) GEMMs.
    x = torch.zeros(0, IN, requires_grad=True)
    w = torch.randn(OUT, IN, requires_grad=True)
    y = emulated_linear(x, w)
    assert y.shape == (0, OUT)
    y.backward(torch.zeros(0, OUT))
    assert x.grad.shape == (0, IN)
    assert torch.equal(w.grad, torch.zeros(OUT, IN))


def test_module_helper_matches_function() -> None:
    layer = FP8EmulatedLinear(IN, OUT)
    assert layer.bias is None
    x, _, _ = _operands(torch.float32)
    with fp8_emulation_stats() as stats:
        y = layer(x)
    assert stats.forward == 1
    assert torch.equal(y, emulated_linear(x, layer.weight.detach()))


def test_spec_and_shape_validation() -> None:
    with pytest.raises(ValueError, match="valid formats"):
        FP8EmulationSpec(grad_fmt="fp8")
    with pytest.raises(ValueError, match="activation_block must be a 1xK tile"):
        FP8EmulationSpec(activation_block=(128, 128))
    with pytest.raises(ValueError, match="weight_block must be a square"):
        FP8EmulationSpec(weight_block=(1, 128))
    with pytest.raises(ValueError, match=r"expected \(out_features, 320\)"):
        emulated_linear(torch.randn(4, IN), torch.randn(OUT, IN + 1))


def test_spec_blocks_from_lists_are_used() -> None:
    spec = FP8EmulationSpec(activation_block=[1, 64], weight_block=[32, 32])
    assert spec.activation_block == (1, 64) and spec.weight_block == (32, 32)
    hash(spec)
    x, w, _ = _operands(torch.float32)
    x2d = x.reshape(-1, IN)
    expected = fake_quantize(x2d, (1, 64)) @ fake_quantize(w, (32, 32)).t()
    assert torch.equal(emulated_linear(x2d, w, spec), expected)
    assert not torch.equal(emulated_linear(x2d, w), expected)


class _QuantiseOneGemm(FP8GemmEmulation):
    """Blockwise E4M3 operands for one of the three GEMMs, exact ones for the others."""

    name = "one gemm"

    def __init__(self, which: str) -> None:
        self.which = which

    def _pair(self, gemm: str, a: torch.Tensor, b: torch.Tensor):
        a, b = a.float(), b.float()
        if gemm == self.which:
            return fake_quantize(a, ROW), fake_quantize(b, ROW)
        return a, b

    def fprop_operands(self, x2d, weight):
        return self._pair("fprop", x2d, weight)

    def dgrad_operands(self, dy2d, weight):
        return self._pair("dgrad", dy2d, weight.t())

    def wgrad_operands(self, dy2d, x2d):
        return self._pair("wgrad", dy2d.t(), x2d.t())


@pytest.mark.parametrize("which", ["fprop", "dgrad", "wgrad", "none"])
def test_each_gemm_reads_the_operands_its_rule_gives(which: str) -> None:
    """One autograd function serves every recipe: each GEMM uses its own operand rule."""
    x, w, dy = _operands(torch.float32)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with fp8_emulation_stats() as stats:
        y = emulated_gemm(x, w, None, _QuantiseOneGemm(which))
        y.backward(dy)
    assert (stats.forward, stats.dgrad, stats.wgrad) == (1, 1, 1)
    x2d, w2d, dy2d = x.detach().reshape(-1, IN), w.detach(), dy.reshape(-1, OUT)
    exact = {"fprop": x2d @ w2d.t(), "dgrad": dy2d @ w2d, "wgrad": dy2d.t() @ x2d}
    got = {"fprop": y.detach().reshape(-1, OUT), "dgrad": x.grad.reshape(-1, IN), "wgrad": w.grad}
    for gemm in exact:
        rel = _rel(got[gemm], exact[gemm])
        if gemm == which:
            assert 3e-3 < rel < 5e-2, (gemm, rel)
        else:
            assert rel < 1e-6, (gemm, rel)
