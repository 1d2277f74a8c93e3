"""The FP8 emulation against PyTorch's real FP8 GEMM (``torch._scaled_mm``), no TE needed.

The emulation claims to reproduce the values an FP8 GEMM reads, and to differ from the
hardware only in the order of fp32 additions. Here the same FP8 codes and scales that
``ling_pretrain.fp8`` computes are handed to cuBLAS / CUTLASS FP8 kernels, and the result
is compared with the emulated GEMM:

* per-tensor scales (the ``tensorwise`` recipe): ``torch._scaled_mm`` on sm89+;
* 1 x 128 activation tiles and 128 x 128 weight blocks (the ``blockwise`` recipe), for the
  forward, dgrad and wgrad GEMMs: ``torch.nn.functional.scaled_mm`` with
  ``ScalingType.BlockWise1x128`` / ``BlockWise128x128``, which PyTorch runs on sm90 with
  CUDA >= 12.9.

Agreement is asked to 2^-11 of ``|a| @ |b|`` (the sum of absolute products), a bound on
accumulation-order and tensor-core accumulator effects; E4M3 rounding moves results by
about 2^-5 of the same quantity, and each test checks that the high-precision product is
far outside the bound, so the comparison can tell FP8 from non-FP8 and a wrong scale or
tile from a right one. These tests skip without such a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from ling_pretrain.fp8.emulation import BlockwiseEmulation, TensorwiseEmulation
from ling_pretrain.fp8.quantize import quantize_blockwise, transpose_blockwise


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (0, 0)


def _cuda_version() -> tuple[int, ...]:
    return tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])


def _why_no_fp8_gemm() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU with FP8 tensor cores; this machine has no CUDA device"
    if _capability() < (8, 9):
        return f"needs compute capability >= 8.9 for FP8 GEMMs, this GPU has {_capability()}"
    return None


def _why_no_blockwise_gemm() -> str | None:
    why = _why_no_fp8_gemm()
    if why:
        return why
    if _capability() != (9, 0):
        return f"PyTorch's blockwise FP8 GEMM runs on sm90 only, this GPU is {_capability()}"
    if _cuda_version() < (12, 9):
        return f"blockwise FP8 GEMMs need CUDA >= 12.9, PyTorch was built with {torch.version.cuda}"
    if not hasattr(torch.nn.functional, "scaled_mm"):
        return "this PyTorch has no torch.nn.functional.scaled_mm"
    return None


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_why_no_fp8_gemm() is not None, reason=str(_why_no_fp8_gemm())),
]
needs_blockwise = pytest.mark.skipif(
    _why_no_blockwise_gemm() is not None, reason=str(_why_no_blockwise_gemm())
)

# Tokens, in-features, out-features: multiples of 128 so every kernel accepts them.
M, K, N = 256, 512, 384
TOL = 2.0**-11


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The emulation multiplies in fp32; TF32 would round its operands."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _skewed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Magnitudes over five decades along both axes, so tiles and scales matter."""
    gen = torch.Generator().manual_seed(seed)
    row_exp = torch.empty(rows, 1).uniform_(-2.5, 2.5, generator=gen)
    col_exp = torch.empty(1, cols).uniform_(-2.5, 2.5, generator=gen)
    return (torch.randn(rows, cols, generator=gen) * torch.pow(10.0, row_exp + col_exp)).cuda()


def _check(real: torch.Tensor, a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor) -> None:
    """``real`` equals the emulated ``a @ b.T`` (fp32) within TOL; ``exact`` is far from it."""
    emulated = a @ b.t()
    scale = a.abs() @ b.abs().t()
    scale = scale + torch.finfo(torch.float32).tiny
    err = ((real.float() - emulated) / scale).abs().max().item()
    assert err <= TOL, f"FP8 kernel vs emulation: {err:.3g} of sum |a||b| (limit {TOL:.3g})"
    fp8_effect = ((exact.float() - emulated) / scale).abs().max().item()
    assert fp8_effect > 8 * TOL, f"FP8 rounding too small to test ({fp8_effect:.3g})"


def _decode_scale(scale_inv: torch.Tensor) -> torch.Tensor:
    """The scale a kernel multiplies by after the GEMM: our ``scale_inv``, fp32, on CUDA."""
    return scale_inv.float().cuda()


def test_tensorwise_emulation_matches_scaled_mm():
    x, w = _skewed(M, K, 0), _skewed(N, K, 1) * 1e-2
    a, b = TensorwiseEmulation().fprop_operands(x, w)  # the emulation's FP8 values
    qx, sx = quantize_blockwise(x, (M, K), "e4m3", power_of_2_scales=False)
    qw, sw = quantize_blockwise(w, (N, K), "e4m3", power_of_2_scales=False)
    assert qx.dtype == torch.float8_e4m3fn and sx.numel() == sw.numel() == 1
    assert not math.log2(sx.item()).is_integer()  # exact, not power-of-2, scales
    real = torch._scaled_mm(
        qx,
        qw.t(),  # column-major (K, N)
        scale_a=_decode_scale(sx).reshape(()),
        scale_b=_decode_scale(sw).reshape(()),
        out_dtype=torch.float32,
        use_fast_accum=False,
    )
    _check(real, a, b, x @ w.t())
    # The emulated layer runs on the GPU too and gives the same product.
    torch.testing.assert_close(TensorwiseEmulation().linear(x, w), a @ b.t())


def _blockwise_mm(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_blocks: bool
) -> torch.Tensor:
    """``a @ b.T`` on the GPU for ``a`` in 1 x 128 tiles and ``b`` in 128 x 128 blocks
    (``b_blocks``) or 1 x 128 tiles, each row-major with our ``scale_inv`` layout."""
    from torch.nn.functional import ScalingType, scaled_mm

    # PyTorch wants 1 x 128 scales "outer-dim-major": (rows, K / 128) with stride (1, rows).
    def outer_major(s: torch.Tensor) -> torch.Tensor:
        return s.t().contiguous().t()

    return scaled_mm(
        a_q,
        b_q.t(),  # (K, N), column-major
        outer_major(_decode_scale(a_s)),
        ScalingType.BlockWise1x128,
        _decode_scale(b_s).t() if b_blocks else outer_major(_decode_scale(b_s)),
        ScalingType.BlockWise128x128 if b_blocks else ScalingType.BlockWise1x128,
        output_dtype=torch.float32,
    )


@needs_blockwise
def test_blockwise_forward_dgrad_wgrad_match_the_fp8_kernel():
    x, w, dy = _skewed(M, K, 0), _skewed(N, K, 1) * 1e-2, _skewed(M, N, 2)
    emulation = BlockwiseEmulation()

    # forward: y = x @ w.T, x in 1 x 128 tiles along K, w in 128 x 128 blocks.
    qx, sx = quantize_blockwise(x, (1, 128))
    qw, sw = quantize_blockwise(w, (128, 128))
    real = _blockwise_mm(qx, sx, qw, sw, b_blocks=True)
    _check(real, *emulation.fprop_operands(x, w), x @ w.t())

    # dgrad: dx = dy @ w, dy in 1 x 128 tiles along N, the same FP8 weight transposed.
    qdy, sdy = quantize_blockwise(dy, (1, 128))
    qwt, swt = transpose_blockwise(qw, sw)
    real = _blockwise_mm(qdy, sdy, qwt, swt, b_blocks=True)
    _check(real, *emulation.dgrad_operands(dy, w), dy @ w)

    # wgrad: dw = dy.T @ x, both re-quantised in 1 x 128 tiles along tokens.
    qdyt, sdyt = quantize_blockwise(dy.t().contiguous(), (1, 128))
    qxt, sxt = quantize_blockwise(x.t().contiguous(), (1, 128))
    real = _blockwise_mm(qdyt, sdyt, qxt, sxt, b_blocks=False)
    _check(real, *emulation.wgrad_operands(dy, x), dy.t() @ x)


@needs_blockwise
def test_a_wrong_tiling_is_caught():
    """The check tells tilings apart: x tiled along tokens instead of K fails it."""
    x, w = _skewed(M, K, 0), _skewed(N, K, 1) * 1e-2
    qx, sx = quantize_blockwise(x, (1, 128))
    qw, sw = quantize_blockwise(w, (128, 128))
    real = _blockwise_mm(qx, sx, qw, sw, b_blocks=True)
    _, b = BlockwiseEmulation().fprop_operands(x, w)
    wrong_a = quantize_blockwise(x.t().contiguous(), (1, 128))
    from ling_pretrain.fp8.quantize import dequantize_blockwise

    a_wrong = dequantize_blockwise(*wrong_a, (1, 128)).t()
    with pytest.raises(AssertionError, match="FP8 kernel vs emulation"):
        _check(real, a_wrong, b, x @ w.t())
