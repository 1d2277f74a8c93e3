"""Blockwise 8-bit dynamic codes: tables, nearest-code search, error bounds, exact re-encoding."""

from __future__ import annotations

import pytest
import torch

from ling_pretrain.optim.quant import BLOCK, BlockCodec, dynamic_codes


@pytest.mark.parametrize("signed", [True, False])
def test_code_tables(signed):
    codes = dynamic_codes(signed)
    assert codes.numel() == 256 and torch.equal(codes, codes.sort().values)
    assert torch.unique(codes).numel() == 256
    assert 0.0 in codes and 1.0 in codes
    if signed:
        assert -1.0 in codes
        # Symmetric except for the smallest negative magnitude, given up for the exact zero.
        pos, neg = codes[codes > 0], -codes[codes < 0].flip(0)
        assert pos.numel() == 128 and torch.equal(pos[1:], neg)
    else:
        assert codes.min() == 0.0
    # Seven decades: the smallest non-zero magnitude is about 1e-7 of the block's absmax.
    assert 1e-7 < codes[codes > 0].min() < 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_matches_brute_force(signed):
    codec = BlockCodec(signed)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.linspace(-1, 1, 200_001),
            (torch.rand(50_000, generator=gen) * 2 - 1)
            * 10.0 ** torch.randint(-9, 1, (50_000,), generator=gen).float(),
            # exactly on the decision boundaries and on the codes
            (codec.codes[1:] + codec.codes[:-1]) / 2,
            codec.codes,
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0]),
        ]
    )
    if not signed:
        x = x.abs()
    got = codec.codes[codec.nearest(x)]
    best = (x[:, None] - codec.codes[None, :]).abs().min(dim=1).values
    # Equal, but for values on a decision boundary (a tie up to the rounding of the midpoint).
    ulp = torch.finfo(torch.float32).eps * x.abs()
    assert torch.all((got - x).abs() - best <= ulp)
    assert ((got - x).abs() != best).sum() <= 256


@pytest.mark.parametrize("signed", [True, False])
def test_error_bound_per_block(signed):
    codec = BlockCodec(signed)
    gen = torch.Generator().manual_seed(1)
    n = 37 * BLOCK + 91  # a flat shard whose last block is partial
    # Blocks of very different scales, as Adam moments have.
    x = (
        torch.randn(n, generator=gen)
        * 10.0 ** torch.randint(-12, 2, (n // BLOCK + 1,)).float().repeat_interleave(BLOCK)[:n]
    )
    if not signed:
        x = x.abs()
    codes, absmax = codec.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (38,)
    y = codec.decode(codes, absmax)
    per_elem_absmax = absmax.repeat_interleave(BLOCK)[:n]
    assert torch.equal(
        per_elem_absmax,
        x.abs()
        .view(-1)
        .new_tensor([x[i : i + BLOCK].abs().max() for i in range(0, n, BLOCK)])
        .repeat_interleave(BLOCK)[:n],
    )
    # Nearest code: at most half the widest gap of the table (times the block's absmax).
    half_gap = float((codec.codes[1:] - codec.codes[:-1]).max() / 2)
    assert half_gap < (0.0071 if signed else 0.0036)
    err = (y - x).abs()
    assert torch.all(err <= half_gap * per_elem_absmax * (1 + 1e-6))
    # Dynamic codes keep small entries relatively precise where linear int8 codes (steps of
    # 1/127 of absmax) would round them to a few levels: entries between 1e-3 and 1e-2 of
    # their block's absmax keep a relative error under 29% (signed; 15% unsigned) where
    # linear codes round some of them to zero.
    rel = x.abs() / per_elem_absmax
    small = (rel > 1e-3) & (rel < 1e-2)
    assert small.sum() > 100
    assert float((err[small] / x.abs()[small]).max()) < (0.29 if signed else 0.15)
    linear = (torch.round(x / per_elem_absmax * 127) / 127 * per_elem_absmax - x).abs()
    assert float((linear[small] / x.abs()[small]).max()) == 1.0
    # The largest entry of every block is exact.
    idx = torch.stack([x[i : i + BLOCK].abs().argmax() + i for i in range(0, n, BLOCK)])
    assert torch.equal(y[idx], x[idx])


@pytest.mark.parametrize("signed", [True, False])
def test_reencoding_decoded_blocks_is_exact(signed):
    codec = BlockCodec(signed)
    gen = torch.Generator().manual_seed(2)
    n = 20 * BLOCK + 7
    x = torch.randn(n, generator=gen)
    x[: 3 * BLOCK] = 0.0  # all-zero blocks
    if signed:
        # blocks whose largest magnitude is negative
        for b in range(3, 20, 2):
            x[b * BLOCK + 5] = -10.0
    else:
        x = x.abs()
    codes, absmax = codec.encode(x)
    assert torch.all(absmax[:3] == 0) and torch.all(
        codes[: 3 * BLOCK] == codec.nearest(torch.zeros(1))
    )
    again = codec.encode(codec.decode(codes, absmax))
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)


def test_blocks_are_independent():
    codec = BlockCodec(signed=True)
    x = torch.randn(4 * BLOCK, generator=torch.Generator().manual_seed(3))
    codes, absmax = codec.encode(x)
    y = x.clone()
    y[BLOCK : 2 * BLOCK] *= 1000.0
    codes2, absmax2 = codec.encode(y)
    keep = torch.ones(4 * BLOCK, dtype=torch.bool)
    keep[BLOCK : 2 * BLOCK] = False
    assert torch.equal(codes[keep], codes2[keep])
    assert torch.equal(absmax[[0, 2, 3]], absmax2[[0, 2, 3]]) and absmax2[1] == 1000 * absmax[1]
