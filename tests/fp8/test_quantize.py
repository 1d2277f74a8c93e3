"""Blockwise FP8 quantisation: tiling, scales, rounding, bounds and special values."""

from __future__ import annotations

import math

import pytest
import torch

from ling_pretrain.fp8.quantize import (
    dequantize_blockwise,
    fake_quantize,
    get_fp8_format,
    quantization_error_bound,
    quantize_blockwise,
    transpose_blockwise,
)

FORMATS = ["e4m3", "e5m2"]
BLOCKS = [(1, 128), (128, 128)]


def _reference_quantize(
    x: torch.Tensor, block: tuple[int, int], fmt: str, power_of_2_scales: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-by-tile quantisation written independently of the library's vector code."""
    spec = get_fp8_format(fmt)
    x = x.float()
    rows, cols = x.shape
    br, bc = block
    n_r, n_c = math.ceil(rows / br), math.ceil(cols / bc)
    q = torch.empty(rows, cols, dtype=spec.dtype)
    scale_inv = torch.empty(n_r, n_c)
    for i in range(n_r):
        for j in range(n_c):
            tile = x[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            amax = tile.abs().max()
            if amax == 0:
                scale = 1.0
            else:
                scale = (torch.tensor(spec.max) / amax).item()
                if power_of_2_scales:
                    _, exponent = math.frexp(scale)
                    scale = math.ldexp(1.0, exponent - 1)
            scaled = tile * torch.tensor(scale, dtype=torch.float32)
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = scaled.clamp(-spec.max, spec.max).to(
                spec.dtype
            )
            scale_inv[i, j] = 1.0 / scale
    return q, scale_inv


def _wide_range_tensor(rows: int, cols: int, block: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random data whose tiles differ by up to 50 decades, with 4 decades per tile.

    The range stays clear of fp32 subnormals, where the error bound does not apply.
    """
    gen = torch.Generator().manual_seed(seed)
    n_r, n_c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    tile_exp = torch.empty(n_r, n_c).uniform_(-25, 25, generator=gen)
    tile_exp = tile_exp.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    elem_exp = torch.empty(rows, cols).uniform_(-4, 0, generator=gen)
    x = torch.randn(rows, cols, generator=gen)
    return x * torch.pow(10.0, tile_exp[:rows, :cols] + elem_exp)


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("shape", "block"),
    [((130, 300), (1, 128)), ((260, 200), (128, 128)), ((128, 256), (128, 128))],
)
def test_matches_tile_by_tile_reference(
    shape: tuple[int, int], block: tuple[int, int], fmt: str
) -> None:
    x = _wide_range_tensor(*shape, block, seed=1)
    q, scale_inv = quantize_blockwise(x, block, fmt)
    q_ref, s_ref = _reference_quantize(x, block, fmt)
    assert q.dtype == get_fp8_format(fmt).dtype
    assert q.shape == x.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == s_ref.shape
    assert torch.equal(scale_inv, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


def test_non_power_of_2_scales_match_reference() -> None:
    x = _wide_range_tensor(64, 300, (1, 128), seed=2)
    q, scale_inv = quantize_blockwise(x, (1, 128), power_of_2_scales=False)
    q_ref, s_ref = _reference_quantize(x, (1, 128), "e4m3", power_of_2_scales=False)
    assert torch.equal(_bits(q), _bits(q_ref))
    # 1 / scale in fp32 vs in double, then rounded to fp32: at most one ulp apart.
    torch.testing.assert_close(scale_inv, s_ref, rtol=2**-23, atol=0)
    mantissa, _ = torch.frexp(scale_inv)
    assert (mantissa != 0.5).any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_cast_rounds_to_nearest_even_at_scale_one(fmt: str) -> None:
    spec = get_fp8_format(fmt)
    codes = torch.arange(256, dtype=torch.uint8).view(spec.dtype).float()
    values, _ = torch.sort(torch.unique(codes[torch.isfinite(codes) & (codes >= 0)]))
    lo, hi = values[:-1], values[1:]
    mid = (lo + hi) / 2
    # Codes of consecutive non-negative values are consecutive integers.
    lo_code = _bits(lo.to(spec.dtype)).int()
    expected_tie = torch.where(lo_code % 2 == 0, lo, hi)
    cases = {
        "tie": (mid, expected_tie),
        "above": (torch.nextafter(mid, hi), hi),
        "below": (torch.nextafter(mid, lo), lo),
    }
    for label, (inputs, expected) in cases.items():
        # A companion element at fp8_max makes each 1x2 tile's scale exactly 1.
        rows = torch.stack([torch.full_like(inputs, spec.max), inputs], dim=1)
        for sign in (1.0, -1.0):
            q, scale_inv = quantize_blockwise(sign * rows, (1, 2), fmt)
            assert torch.equal(scale_inv, torch.ones_like(scale_inv)), label
            assert torch.equal(q[:, 1].float(), sign * expected), (label, sign)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_scales_are_largest_non_overflowing_power_of_2(block: tuple[int, int], fmt: str) -> None:
    x = _wide_range_tensor(256, 384, block, seed=3)
    spec = get_fp8_format(fmt)
    _, scale_inv = quantize_blockwise(x, block, fmt)
    mantissa, _ = torch.frexp(scale_inv)
    assert torch.all(mantissa == 0.5)
    amax = x.abs().reshape(256 // block[0], block[0], 384 // block[1], block[1])
    amax = amax.amax(dim=(1, 3))
    in_fp8_units = amax / scale_inv
    assert torch.all(in_fp8_units <= spec.max)
    assert torch.all(in_fp8_units > spec.max / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_error_bound_holds_and_is_tight(
    block: tuple[int, int], fmt: str, dtype: torch.dtype
) -> None:
    x = _wide_range_tensor(256, 300, block, seed=4).to(dtype)
    spec = get_fp8_format(fmt)
    q, scale_inv = quantize_blockwise(x, block, fmt)
    err = (dequantize_blockwise(q, scale_inv, block) - x.float()).abs()
    bound = quantization_error_bound(x, scale_inv, block, fmt)

    assert torch.all(err <= bound)
    assert (err / bound).max() > 0.9

    s_elem = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    s_elem = s_elem[: x.shape[0], : x.shape[1]]
    simple = torch.maximum(
        x.float().abs() * spec.relative_half_ulp, spec.subnormal_step / 2 * s_elem
    )
    assert torch.all(bound <= simple)
    assert torch.all(err <= simple)
    normal = x.float().abs() / s_elem >= 2.0**spec.min_normal_exponent
    assert normal.sum() > x.numel() // 2
    assert torch.all(err[normal] <= x.float().abs()[normal] * spec.relative_half_ulp)


def test_error_bound_constants() -> None:
    e4m3, e5m2 = get_fp8_format("e4m3"), get_fp8_format("e5m2")
    assert (e4m3.max, e4m3.relative_half_ulp, e4m3.subnormal_step) == (
        448.0,
        2.0**-4,
        2.0**-9,
    )
    assert (e5m2.max, e5m2.relative_half_ulp, e5m2.subnormal_step) == (
        57344.0,
        2.0**-3,
        2.0**-16,
    )
    assert e4m3.max == torch.finfo(torch.float8_e4m3fn).max
    assert e5m2.max == torch.finfo(torch.float8_e5m2).max
    assert 2.0**e4m3.min_normal_exponent == torch.finfo(torch.float8_e4m3fn).tiny
    assert 2.0**e5m2.min_normal_exponent == torch.finfo(torch.float8_e5m2).tiny


@pytest.mark.parametrize("block", BLOCKS)
def test_tiles_are_independent(block: tuple[int, int]) -> None:
    x = _wide_range_tensor(256, 256, block, seed=5)
    q, scale_inv = quantize_blockwise(x, block)
    changed = x.clone()
    changed[: block[0], : block[1]] *= 1000.0
    changed[0, 0] = 7.0e6
    q2, s2 = quantize_blockwise(changed, block)

    tile_rows, tile_cols = slice(0, block[0]), slice(0, block[1])
    assert s2[0, 0] != scale_inv[0, 0]
    assert not torch.equal(_bits(q2[tile_rows, tile_cols]), _bits(q[tile_rows, tile_cols]))
    keep = torch.ones_like(scale_inv, dtype=torch.bool)
    keep[0, 0] = False
    assert torch.equal(s2[keep], scale_inv[keep])
    elem_keep = torch.ones(x.shape, dtype=torch.bool)
    elem_keep[tile_rows, tile_cols] = False
    assert torch.equal(_bits(q2)[elem_keep], _bits(q)[elem_keep])


@pytest.mark.parametrize("block", BLOCKS)
def test_all_zero_tiles_give_zeros_and_unit_scale(block: tuple[int, int]) -> None:
    x = torch.randn(256, 256) * 1e-3
    x[: block[0], : block[1]] = 0.0
    q, scale_inv = quantize_blockwise(x, block)
    assert scale_inv[0, 0] == 1.0
    assert torch.all(q[: block[0], : block[1]].float() == 0.0)
    assert torch.all(scale_inv[0, 1:] < 1.0)
    deq = dequantize_blockwise(q, scale_inv, block)
    assert torch.all(deq[: block[0], : block[1]] == 0.0)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(1e30, torch.float32), (3.28e38, torch.bfloat16), (3.2e38, torch.float32)],
)
def test_huge_values_stay_finite_and_within_range(value: float, dtype: torch.dtype) -> None:
    x = torch.randn(4, 256).to(dtype)
    x[1, 5] = value
    x[2, 200] = -value
    q, scale_inv = quantize_blockwise(x, (1, 128))
    deq = dequantize_blockwise(q, scale_inv, (1, 128))
    assert torch.isfinite(q.float()).all() and torch.isfinite(deq).all()
    s_elem = scale_inv.repeat_interleave(128, 1)
    assert torch.all(deq.abs() <= 448.0 * s_elem)
    huge = x.float().abs() > 1e20
    assert torch.all((deq[huge] - x.float()[huge]).abs() <= x.float().abs()[huge] / 16)
    # The untouched tiles are unaffected by the huge neighbours.
    assert torch.all(scale_inv[0] < 1.0) and scale_inv[1, 1] < 1.0
    assert scale_inv[1, 0] > 1e20 and scale_inv[2, 1] > 1e20

    # Without power-of-2 rounding the amax lands exactly on the top of the range.
    q, scale_inv = quantize_blockwise(x, (1, 128), power_of_2_scales=False)
    assert q[1, 5].float() == 448.0 and q[2, 200].float() == -448.0
    deq = dequantize_blockwise(q, scale_inv, (1, 128))
    assert deq[1, 5] == 448.0 * scale_inv[1, 0]


def test_largest_bf16_values_round_up_to_2_to_128() -> None:
    # Documented edge: 3.39e38 * 2^-120 = 255 rounds to the E4M3 code 256, worth 2^128.
    x = torch.randn(2, 128).to(torch.bfloat16)
    x[0, 0] = torch.finfo(torch.bfloat16).max
    q, scale_inv = quantize_blockwise(x, (1, 128))
    assert q[0, 0].float() == 256.0 and scale_inv[0, 0] == 2.0**120
    deq = dequantize_blockwise(q, scale_inv, (1, 128))
    assert deq[0, 0] == float("inf")
    assert not torch.isnan(deq).any()
    assert torch.isfinite(deq[0, 1:]).all() and torch.isfinite(deq[1]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_infinity_saturates_when_checks_are_off(fmt: str) -> None:
    spec = get_fp8_format(fmt)
    x = torch.randn(3, 256)
    x[0, 3] = float("inf")
    x[0, 4] = float("-inf")
    q, scale_inv = quantize_blockwise(x, (1, 128), fmt, check_finite=False)
    assert q[0, 3].float() == spec.max and q[0, 4].float() == -spec.max
    assert scale_inv[0, 0] == 1.0
    clean_q, clean_s = quantize_blockwise(x[1:], (1, 128), fmt)
    assert torch.equal(_bits(q[1:]), _bits(clean_q))
    assert torch.equal(scale_inv[1:], clean_s)


def test_nan_is_ignored_for_amax_and_kept_when_checks_are_off() -> None:
    x = torch.randn(2, 128)
    x_nan = x.clone()
    x_nan[0, 7] = float("nan")
    q, scale_inv = quantize_blockwise(x_nan, (1, 128), check_finite=False)
    assert torch.isnan(q[0, 7].float())
    assert torch.isnan(q.float()).sum() == 1
    x_zero = x.clone()
    x_zero[0, 7] = 0.0
    q_ref, s_ref = quantize_blockwise(x_zero, (1, 128))
    assert torch.equal(scale_inv, s_ref)
    keep = ~torch.isnan(q.float())
    assert torch.equal(q.float()[keep], q_ref.float()[keep])


@pytest.mark.parametrize(
    ("bad", "count"), [(float("nan"), "2 NaN and 0 Inf"), (float("inf"), "0 NaN and 2 Inf")]
)
def test_nonfinite_values_are_reported(bad: float, count: str) -> None:
    x = torch.randn(5, 300)
    x[1, 2] = bad
    x[4, 299] = -bad
    with pytest.raises(FloatingPointError, match=rf"shape \(5, 300\).*{count}"):
        quantize_blockwise(x, (1, 128))
    with pytest.raises(FloatingPointError, match="my weight"):
        fake_quantize(x, (128, 128), name="my weight")


def test_partial_edge_tiles_use_only_real_elements() -> None:
    x = torch.full((3, 130), 100.0)
    x[:, 128:] = 0.01
    q, scale_inv = quantize_blockwise(x, (1, 128))
    assert scale_inv.shape == (3, 2)
    # 0.01 * 2^15 = 327.68 lies in (224, 448]: the edge tile's scale is 2^15.
    assert torch.all(scale_inv[:, 1] == 2.0**-15)
    assert torch.all(scale_inv[:, 0] == 2.0**-2)
    deq = dequantize_blockwise(q, scale_inv, (1, 128))
    assert torch.all((deq[:, 128:] - 0.01).abs() <= 0.01 / 16)

    w = torch.full((130, 129), 3.0)
    w[128:, :] = 1e-4
    w[:, 128:] = 5e4
    q, scale_inv = quantize_blockwise(w, (128, 128))
    assert scale_inv.shape == (2, 2)
    assert scale_inv[0, 0] == 2.0**-7  # 3 * 2^7 = 384
    assert scale_inv[1, 0] == 2.0**-22  # 1e-4 * 2^22 = 419.4
    assert scale_inv[0, 1] == 2.0**7  # 5e4 * 2^-7 = 390.6
    assert scale_inv[1, 1] == 2.0**7


def test_nd_input_flattens_leading_dims_for_row_tiles() -> None:
    x = torch.randn(2, 3, 300) * torch.logspace(-3, 3, 300)
    q, scale_inv = quantize_blockwise(x, (1, 128))
    assert q.shape == x.shape
    assert scale_inv.shape == (2, 3, 3)
    q2, s2 = quantize_blockwise(x.reshape(6, 300), (1, 128))
    assert torch.equal(_bits(q).reshape(6, 300), _bits(q2))
    assert torch.equal(scale_inv.reshape(6, 3), s2)
    deq = dequantize_blockwise(q, scale_inv, (1, 128))
    assert torch.equal(deq.reshape(6, 300), dequantize_blockwise(q2, s2, (1, 128)))
    with pytest.raises(ValueError, match="must be 2-D"):
        quantize_blockwise(x, (128, 128))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fake_quantize_keeps_dtype_and_matches_fp32_path(dtype: torch.dtype) -> None:
    x = (torch.randn(64, 256) * 10).to(dtype)
    out = fake_quantize(x, (1, 128))
    assert out.dtype == dtype
    expected = dequantize_blockwise(*quantize_blockwise(x.float(), (1, 128)), (1, 128))
    assert torch.equal(out.float(), expected)
    assert not torch.equal(out.float(), x.float())


def test_e5m2_is_coarser_but_wider_than_e4m3() -> None:
    x = torch.randn(64, 256)
    err = {fmt: (fake_quantize(x, (1, 128), fmt) - x).abs().max().item() for fmt in FORMATS}
    assert err["e5m2"] > err["e4m3"]
    q, _ = quantize_blockwise(x, (1, 128), "e5m2")
    assert q.dtype == torch.float8_e5m2
    tile_amax = q.float().abs().reshape(64, 2, 128).amax(dim=-1)
    assert torch.all(tile_amax >= 57344.0 / 2)
    assert torch.all(tile_amax <= 57344.0)


def test_amax_epsilon_floors_the_amax() -> None:
    x = torch.full((2, 128), 1e-6)
    x[1] = 10.0
    _, scale_inv = quantize_blockwise(x, (1, 128), amax_epsilon=1e-3)
    assert scale_inv[0] == 2.0**-18  # 448 / 1e-3 = 448000 -> 2^18
    assert scale_inv[1] == 2.0**-5  # epsilon does not affect larger tiles


def test_scale_overflowing_fp32_becomes_2_to_127() -> None:
    x = torch.zeros(1, 128)
    x[0, 0] = 1e-45  # fp32 subnormal: 448 / amax overflows to inf
    q, scale_inv = quantize_blockwise(x, (1, 128))
    assert scale_inv[0, 0] == 2.0**-127
    assert torch.all(q.float() == 0.0)


def test_transpose_of_square_blocks_is_lossless() -> None:
    w = _wide_range_tensor(300, 200, (128, 128), seed=6)
    q, scale_inv = quantize_blockwise(w, (128, 128))
    qt, st = transpose_blockwise(q, scale_inv)
    assert qt.shape == (200, 300) and st.shape == (2, 3)
    deq_t = dequantize_blockwise(qt, st, (128, 128))
    assert torch.equal(deq_t, dequantize_blockwise(q, scale_inv, (128, 128)).t())
    # Quantising the transposed weight afresh gives the very same codes and scales.
    q_direct, s_direct = quantize_blockwise(w.t(), (128, 128))
    assert torch.equal(_bits(q_direct), _bits(qt))
    assert torch.equal(s_direct, st)


def test_row_tiles_do_not_survive_transposition() -> None:
    # With power-of-2 scales, normal-range values round the same under any tile scale;
    # tilings disagree on the elements that are small next to their tile's amax (FP8
    # subnormals or flushed to zero), so the data spans six decades.
    gen = torch.Generator().manual_seed(7)
    magnitude = torch.empty(256, 256).uniform_(-6, 0, generator=gen)
    x = torch.randn(256, 256, generator=gen) * torch.pow(10.0, magnitude)
    deq_rows = fake_quantize(x, (1, 128))
    # Column-wise copy quantised from the original, as TE does for wgrad.
    deq_cols = fake_quantize(x.t(), (1, 128)).t()
    assert (deq_rows != deq_cols).float().mean() > 0.02
    # Re-quantising the row-wise copy column-wise adds a second rounding.
    requant = fake_quantize(deq_rows.t(), (1, 128)).t()
    assert (requant != deq_rows).float().mean() > 0.01
    with pytest.raises(ValueError, match="square"):
        transpose_blockwise(*quantize_blockwise(x, (1, 128)), (1, 128))


def test_empty_tensors_quantize() -> None:
    for shape in [(0, 256), (256, 0)]:
        x = torch.empty(shape)
        q, scale_inv = quantize_blockwise(x, (1, 128))
        assert q.shape == shape
        assert scale_inv.shape == (shape[0], math.ceil(shape[1] / 128))
        assert dequantize_blockwise(q, scale_inv, (1, 128)).shape == shape


def test_invalid_arguments_are_rejected() -> None:
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match=r"valid formats: \['e4m3', 'e5m2'\]"):
        quantize_blockwise(x, (1, 128), "e3m4")
    with pytest.raises(ValueError, match="positive ints"):
        quantize_blockwise(x, (0, 128))
    with pytest.raises(TypeError, match="floating point"):
        quantize_blockwise(torch.ones(4, 128, dtype=torch.int32))
    q, scale_inv = quantize_blockwise(x, (1, 128))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blockwise(q, scale_inv, (1, 64))
