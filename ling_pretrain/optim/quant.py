"""Blockwise 8-bit codes for Adam's moments.

Each moment is split into blocks of 256 consecutive elements (a flat distributed-optimizer
shard of any length: the last block may be shorter). A block stores one fp32 ``absmax`` (the
largest magnitude in it) and one byte per element: the index of the code nearest to
``x / absmax`` in a fixed table of 256 values in [-1, 1] ("dynamic" codes, as in Dettmers et
al., *8-bit Optimizers via Block-wise Quantization*, 2022).

Dynamic codes spread their values over seven decades: level ``e`` (0..6) holds ``2**e``
(signed table) or ``2**(e+1)`` (unsigned table) values ``10**(e-6) * f``, where the ``f`` are
the midpoints of an even split of [0.1, 1]. Small entries of a block therefore keep a relative
precision that linear int8 codes (1/127 of the block's largest entry) would lose. The first
moment is signed; the second is not negative, so its table spends the sign bit on twice as
many fractions.

Both tables contain 0 and +-1 exactly (the signed one gives up its smallest negative value to
hold -1). Because the largest entry of a block always encodes as +-1, decoding a block and
encoding it again returns the same bytes and the same absmax. That is what lets a checkpoint
hold the moments as plain fp32 (readable by any Adam) and still resume bit for bit.
"""

from __future__ import annotations

import torch

BLOCK = 256
"""Elements per quantisation block (one fp32 absmax each)."""


def dynamic_codes(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 code values of the dynamic map (see the module docstring)."""
    magnitudes = []
    for level in range(7):
        count = 2**level if signed else 2 ** (level + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2
        magnitudes.append(mids * 10.0 ** (level - 6))
    mags = torch.cat(magnitudes)
    if signed:
        # 127 magnitudes and 1.0 on each side is 256 with no room for 0: drop the
        # smallest negative value (1e-6 of the block's absmax) for an exact zero.
        positive = torch.cat([mags, torch.ones(1, dtype=torch.float64)])
        negative = -positive.sort().values[1:]
        values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    else:
        values = torch.cat(
            [torch.zeros(1, dtype=torch.float64), mags, torch.ones(1, dtype=torch.float64)]
        )
    values = values.sort().values.to(torch.float32)
    assert values.numel() == 256 and torch.unique(values).numel() == 256
    return values


_BUCKET_SHIFT = 12
"""Nearest-code search buckets fp32 values by their top 20 bits (sign, exponent, 11 mantissa
bits): a bucket spans a relative width of 2**-11, less than the narrowest relative gap
between two codes (0.7%), so it holds at most one decision boundary and one comparison after
the table look-up finds the nearest code."""


class BlockCodec:
    """Encodes flat fp32 tensors as (uint8 codes, fp32 absmax per block) with one code table."""

    def __init__(self, signed: bool, device: torch.device | str = "cpu"):
        self.signed = signed
        self.codes = dynamic_codes(signed)
        bounds = (self.codes[1:] + self.codes[:-1]) / 2
        self._bounds = torch.cat([bounds, torch.full((1,), float("inf"))])
        # For every bucket, the code nearest to its smallest value (buckets of negative
        # numbers grow downwards: their smallest value has all low bits set).
        top = torch.arange(1 << (32 - _BUCKET_SHIFT), dtype=torch.int64)
        low = torch.where(top >= 1 << (31 - _BUCKET_SHIFT), (1 << _BUCKET_SHIFT) - 1, 0)
        bits = (top << _BUCKET_SHIFT) | low
        smallest = (bits - (bits >= 1 << 31).long() * (1 << 32)).to(torch.int32).view(torch.float32)
        smallest = smallest.nan_to_num(nan=0.0).clamp(-1.0, 1.0)
        self._table = torch.bucketize(smallest, bounds).to(torch.int32)
        self.to(device)

    def to(self, device: torch.device | str) -> BlockCodec:
        if self.codes.device != torch.device(device):
            self.codes = self.codes.to(device)
            self._bounds = self._bounds.to(device)
            self._table = self._table.to(device)
        return self

    @staticmethod
    def num_blocks(numel: int) -> int:
        return (numel + BLOCK - 1) // BLOCK

    def nearest(self, normed: torch.Tensor) -> torch.Tensor:
        """Index (int32) of the code nearest to each value of ``normed`` (in [-1, 1])."""
        # int32 indices and index_select: several times faster on CPU than int64 gathers.
        bucket = (normed.view(torch.int32) >> _BUCKET_SHIFT) & ((1 << (32 - _BUCKET_SHIFT)) - 1)
        idx = self._table.index_select(0, bucket)
        return idx + (normed > self._bounds.index_select(0, idx)).to(torch.int32)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise a flat fp32 tensor: returns ``(codes uint8 [n], absmax fp32 [blocks])``."""
        assert x.dim() == 1 and x.dtype == torch.float32, (x.shape, x.dtype)
        self.to(x.device)
        n = x.numel()
        blocks = self.num_blocks(n)
        if n == blocks * BLOCK:
            padded = x.view(blocks, BLOCK)
        else:
            padded = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=x.device)
            padded[:n] = x
            padded = padded.view(blocks, BLOCK)
        absmax = padded.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        normed = (padded / scale[:, None]).clamp_(-1.0, 1.0)
        if not self.signed:
            normed.clamp_(min=0.0)
        idx = self.nearest(normed.view(-1)[:n])
        return idx.to(torch.uint8), absmax

    def decode(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """The fp32 values of ``codes`` (flat) scaled by their block's ``absmax``."""
        self.to(codes.device)
        n = codes.numel()
        blocks = absmax.numel()
        decoded = self.codes.index_select(0, codes.to(torch.int32))
        if n == blocks * BLOCK:
            return (decoded.view(blocks, BLOCK) * absmax[:, None]).view(-1)
        values = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=codes.device)
        values[:n] = decoded
        return (values.view(blocks, BLOCK) * absmax[:, None]).view(-1)[:n]
