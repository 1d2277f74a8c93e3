"""Blockwise FP8 quantisation, emulated in plain PyTorch.

Why this module exists
----------------------
Ling 2.0 trains with TransformerEngine's ``Float8BlockScaling`` recipe, whose kernels
only run on Hopper GPUs. To study or test that recipe anywhere (CPU CI, a laptop, a GPU
without FP8 units) we reproduce its quantise -> dequantise round trip in ordinary tensor
ops, following TE's rules for tiles, scales, rounding and saturation one by one. Only the GEMMs themselves are emulated differently (see
``emulation.py``): here we care about the values that reach the GEMM.

The two 8-bit formats
---------------------
An FP8 number is ``sign x 2^exponent x 1.mantissa`` packed into one byte.

* **E4M3** (``torch.float8_e4m3fn``): 4 exponent bits, 3 mantissa bits, bias 7. Normal
  numbers run from 2^-6 up to 448 (= 1.75 x 2^8); the "fn" variant gives up infinities so
  that the top exponent still holds normal numbers, keeping only the all-ones code (per
  sign) as NaN. Below
  2^-6 come subnormals spaced 2^-9 apart. With 3 mantissa bits there are 8 values per
  power-of-two interval, so rounding to nearest is off by at most half a step: a relative
  error of 2^-4 (6.25 %) in the normal range. This is the format of the blockwise
  recipe for activations, weights *and* gradients ("E4M3 everywhere").
* **E5M2** (``torch.float8_e5m2``): 5 exponent bits, 2 mantissa bits, bias 15, IEEE-like
  with infinities. Range 2^-14 .. 57344 for normals, subnormal spacing 2^-16, relative
  rounding error 2^-3. The "hybrid" recipes use it for gradients, which need range more
  than precision.

Scaling
-------
One byte cannot hold a tensor's dynamic range, so every tile of the tensor gets its own
fp32 scale. Per tile we take ``amax`` (the largest magnitude), compute
``scale = fp8_max / amax`` so the largest element lands at the top of the FP8 range,
store ``x * scale`` in FP8, and keep ``scale_inv = 1 / scale`` for dequantisation::

    x ~= q.float() * scale_inv        (scale_inv broadcast over its tile)

Tiles follow TE: **1 x 128** tiles (128 consecutive elements of one row, i.e. along the
last, reduction, dimension) for activations and gradients, and **128 x 128** blocks for
weights. Tiles at the right or bottom edge of a tensor whose size is not a multiple of the
tile are partial; their amax is taken over the real elements only.

With ``power_of_2_scales`` (the recipe's default) the scale is rounded *down* to a power
of two, ``scale = 2^floor(log2(fp8_max / amax))``, exactly as TE does it: by clearing
the mantissa bits of the fp32 scale. Rounding down means ``amax * scale <= fp8_max``, so
nothing overflows; the price is that the tile uses between half and all of the FP8 range
(its amax lands in ``(fp8_max / 2, fp8_max]``). In exchange, multiplying by the scale and
by its inverse is exact, and the scale of a 128 x 128 block is the same whichever way the
block is read, so transposing a quantised weight is lossless (``transpose_blockwise``).

A consequence worth knowing: with power-of-2 scales an element in FP8's normal range
rounds to the same value whatever its tile's scale, since scaling by 2^k only shifts the
exponent. Two tilings of the same tensor (row-wise vs column-wise 1 x 128) therefore
disagree only on elements that are small next to their tile's amax: below about 2^-14 of
it for E4M3, where they become FP8 subnormals or flush to zero.

Rounding is a cast to ``torch.float8_*``: round to nearest, ties to even, which is what
the hardware conversion does. Values are clamped to ``+-fp8_max`` first, so a value that
ends up just above the top of the range (possible after fp32 rounding of the scale, or for
an infinity) saturates instead of turning into NaN/Inf, like TE's saturating conversion.

Special cases, mirroring TE's ``compute_scale_from_amax``:

* ``amax < amax_epsilon``: amax is raised to ``amax_epsilon`` (0 by default: no effect).
* ``amax == 0`` (an all-zero tile): scale 1, ``scale_inv`` 1, q all zeros.
* ``fp8_max / amax`` overflows fp32 (amax below ~1.3e-36): the scale becomes the largest
  fp32 value, i.e. 2^127 after power-of-2 rounding.
* At the very top of fp32's range dequantisation can overflow: a tile maximum within
  half an FP8 step of 2^128 (for E4M3, ``|x| >= 1.9375 * 2^127 ~ 3.3e38``, which
  includes the largest bf16 numbers) rounds up to an FP8 code worth exactly 2^128, i.e.
  ``inf`` in fp32. TE's rules give the same code and scale; such inputs are not
  meaningful training data anyway.

Non-finite inputs (policy)
--------------------------
By default (``check_finite=True``) quantisation refuses NaN and Inf: it raises
``FloatingPointError`` naming how many there are and the tensor's shape, because a
non-finite value in an FP8 GEMM silently poisons or zeroes a whole tile and training would
carry on with garbage. With ``check_finite=False`` the emulation does what TE's kernels do:
NaN is ignored when taking the amax (as an ``fmaxf`` reduction on the GPU does) and stays
NaN in ``q``;
an infinite amax gives the tile scale 1, so +-Inf saturates to +-fp8_max and the tile's
other values are quantised with scale 1.

Error bound
-----------
For an element ``x`` in a tile with scale ``s`` (power of two), ``y = x * s`` is exact and
the cast moves it by at most half the FP8 spacing at ``|y|``::

    |y - q| <= 2^(e - m - 1),   e = max(floor(log2 |y|), e_min)

with ``m`` mantissa bits and ``e_min`` the smallest normal exponent (E4M3: m=3, e_min=-6;
E5M2: m=2, e_min=-14). Dividing by ``s`` gives the bound in x's units, which
``quantization_error_bound`` returns per element. It is attained: a value half-way
between two FP8 neighbours has exactly that error. A simpler, slightly looser form is
``|x - deq(x)| <= max(|x| * 2^-(m+1), 2^(e_min - m - 1) * scale_inv)``, i.e. for E4M3
``max(|x| / 16, scale_inv / 1024)``. Both assume ``x`` is zero or an fp32 normal
number (``|x| >= 2^-126``); below that the fp32 product ``q * scale_inv`` rounds too.

Differences from TE that do not change values: ``scale_inv`` here has exactly one entry
per tile in row-major tile order, with no padding of its dimensions to multiples of 4 as
TE's GEMM-ready layout has.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "FP8Format",
    "dequantize_blockwise",
    "fake_quantize",
    "get_fp8_format",
    "quantization_error_bound",
    "quantize_blockwise",
    "raise_if_nonfinite",
    "transpose_blockwise",
]

Block = tuple[int, int]

# Clearing the 23 mantissa bits of a positive fp32 number leaves 2^floor(log2(value)).
_FP32_EXPONENT_MASK = 0x7F800000
_FP32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class FP8Format:
    """Facts about one FP8 format that quantisation and its error bound need.

    Attributes:
        name: ``"e4m3"`` or ``"e5m2"``.
        dtype: The torch storage dtype.
        max: Largest finite magnitude (448 for E4M3, 57344 for E5M2).
        mantissa_bits: Explicit mantissa bits (3 for E4M3, 2 for E5M2).
        min_normal_exponent: Exponent of the smallest normal number (-6 / -14).
    """

    name: str
    dtype: torch.dtype
    max: float
    mantissa_bits: int
    min_normal_exponent: int

    @property
    def relative_half_ulp(self) -> float:
        """Largest relative rounding error in the normal range, 2^-(m+1)."""
        return 2.0 ** -(self.mantissa_bits + 1)

    @property
    def subnormal_step(self) -> float:
        """Spacing of the subnormal numbers, 2^(e_min - m)."""
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)


_FORMATS = {
    "e4m3": FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 3, -6),
    "e5m2": FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2, -14),
}


def get_fp8_format(fmt: str) -> FP8Format:
    """Looks up an FP8 format by name.

    Args:
        fmt: ``"e4m3"`` or ``"e5m2"``.

    Returns:
        The format's description.

    Raises:
        ValueError: For an unknown name; the message lists the valid ones.
    """
    try:
        return _FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown FP8 format {fmt!r}; valid formats: {sorted(_FORMATS)}") from None


def _check_block(block: Block) -> Block:
    if (
        len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in block)
        or min(block) < 1
    ):
        raise ValueError(
            f"block must be two positive ints (rows, cols), e.g. (1, 128) or "
            f"(128, 128); got {block!r}"
        )
    return (block[0], block[1])


def raise_if_nonfinite(x: torch.Tensor, *, name: str = "tensor") -> None:
    """Raises if ``x`` holds NaN or Inf.

    On CUDA this synchronises with the device (one boolean comes back to the host).

    Args:
        x: Any floating-point tensor.
        name: What ``x`` is, for the message (e.g. ``"output gradient"``).

    Raises:
        FloatingPointError: Naming the NaN and Inf counts, the shape and the dtype.
    """
    if bool(torch.isfinite(x).all()):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    raise FloatingPointError(
        f"FP8 quantization of {name} with shape {tuple(x.shape)} and dtype {x.dtype}: "
        f"found {n_nan} NaN and {n_inf} Inf values out of {x.numel()}; pass "
        f"check_finite=False to quantize them the way TransformerEngine does "
        f"(NaN stays NaN, Inf saturates)"
    )


def _as_2d(x: torch.Tensor, block: Block, what: str) -> torch.Tensor:
    """Views ``x`` as a matrix: leading dims are flattened for 1 x K tiles."""
    if block[0] == 1:
        if x.dim() == 0:
            raise ValueError(f"{what} must have at least one dimension")
        return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if x.dim() != 2:
        raise ValueError(
            f"{what} must be 2-D for {block[0]}x{block[1]} blocks, got shape "
            f"{tuple(x.shape)}; only 1xK tiles accept N-D input"
        )
    return x


def _tile_grid(rows: int, cols: int, block: Block) -> tuple[int, int]:
    return -(-rows // block[0]), -(-cols // block[1])


def _tiled(x2d: torch.Tensor, block: Block) -> torch.Tensor:
    """Zero-pads a matrix to whole tiles and views it as (tile_row, r, tile_col, c)."""
    rows, cols = x2d.shape
    n_r, n_c = _tile_grid(rows, cols, block)
    pad_r, pad_c = n_r * block[0] - rows, n_c * block[1] - cols
    if pad_r or pad_c:
        x2d = F.pad(x2d, (0, pad_c, 0, pad_r))
    return x2d.reshape(n_r, block[0], n_c, block[1])


def _untiled(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n_r, br, n_c, bc = t.shape
    return t.reshape(n_r * br, n_c * bc)[:rows, :cols]


def _scale_from_amax(
    amax: torch.Tensor, fp8_max: float, power_of_2_scales: bool, amax_epsilon: float
) -> torch.Tensor:
    """Per-tile fp32 scale, following TE's ``compute_scale_from_amax`` case by case."""
    amax = torch.clamp_min(amax, amax_epsilon)
    # An explicit division: ``float / tensor`` in torch is reciprocal-then-multiply,
    # which rounds twice and can differ from TE's correctly rounded division.
    scale = torch.div(torch.full_like(amax, fp8_max), amax)
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, _FP32_MAX), scale)
    scale = torch.where((amax == 0) | torch.isinf(amax), torch.ones_like(scale), scale)
    if power_of_2_scales:
        bits = scale.view(torch.int32) & _FP32_EXPONENT_MASK
        scale = bits.view(torch.float32)
    return scale


def _saturating_cast(y: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    return y.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def quantize_blockwise(
    x: torch.Tensor,
    block: Block = (1, 128),
    fmt: str = "e4m3",
    *,
    power_of_2_scales: bool = True,
    amax_epsilon: float = 0.0,
    check_finite: bool = True,
    name: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantises ``x`` to FP8 with one scale per tile, as TE's blockwise recipe does.

    Not differentiable: ``x`` is detached. Arithmetic is fp32 whatever ``x``'s dtype.

    Args:
        x: Floating-point tensor. 2-D for any block; N-D for 1 x K tiles, whose leading
            dimensions are flattened into rows.
        block: Tile shape (rows, cols). ``(1, 128)`` tiles run along the last dimension
            (activations, gradients); ``(128, 128)`` blocks are for weights.
        fmt: ``"e4m3"`` or ``"e5m2"``.
        power_of_2_scales: Round each scale down to a power of two (TE's default).
        amax_epsilon: Lower bound applied to each tile's amax.
        check_finite: Raise on NaN/Inf (see the module docstring for the policy).
        name: What ``x`` is, for error messages.

    Returns:
        ``(q, scale_inv)``: ``q`` has ``x``'s shape and the FP8 dtype; ``scale_inv`` is
        fp32 with one value per tile, shape ``(ceil(rows / br), ceil(cols / bc))`` for
        2-D input, or ``(*x.shape[:-1], ceil(cols / bc))`` for N-D input with 1 x K
        tiles. The dequantised value is ``q.float() * scale_inv`` over each tile.

    Raises:
        ValueError: Bad block, format or shape.
        TypeError: ``x`` is not a floating-point tensor.
        FloatingPointError: ``check_finite`` and ``x`` holds NaN or Inf.
    """
    fp8 = get_fp8_format(fmt)
    block = _check_block(block)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    x = x.detach()
    x2d = _as_2d(x, block, name)
    if check_finite:
        raise_if_nonfinite(x2d, name=name)

    rows, cols = x2d.shape
    tiles = _tiled(x2d.float(), block)
    mag = tiles.abs()
    if not check_finite:
        mag = torch.where(torch.isnan(mag), torch.zeros_like(mag), mag)
    amax = mag.amax(dim=(1, 3))
    scale = _scale_from_amax(amax, fp8.max, power_of_2_scales, amax_epsilon)
    scale_inv = torch.div(torch.ones_like(scale), scale)

    scaled = _untiled(tiles * scale[:, None, :, None], rows, cols)
    q = _saturating_cast(scaled, fp8).reshape(x.shape)
    if block[0] == 1 and x.dim() != 2:
        scale_inv = scale_inv.reshape(*x.shape[:-1], scale_inv.shape[-1])
    return q, scale_inv


def _scale_inv_2d(scale_inv: torch.Tensor, rows: int, cols: int, block: Block) -> torch.Tensor:
    grid = _tile_grid(rows, cols, block)
    if scale_inv.dim() == 0:
        raise ValueError("scale_inv must have at least one dimension")
    s2d = scale_inv.reshape(math.prod(scale_inv.shape[:-1]), scale_inv.shape[-1])
    if tuple(s2d.shape) != grid:
        raise ValueError(
            f"scale_inv of shape {tuple(scale_inv.shape)} does not match a "
            f"{rows}x{cols} tensor in {block[0]}x{block[1]} tiles (expected "
            f"{grid[0]}x{grid[1]} tiles)"
        )
    return s2d.float()


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: Block = (1, 128)
) -> torch.Tensor:
    """Turns FP8 data and per-tile inverse scales back into fp32.

    Args:
        q: FP8 tensor from ``quantize_blockwise`` (any dtype castable to fp32 works).
        scale_inv: Per-tile inverse scales, as returned with ``q``.
        block: The tile shape ``q`` was quantised with.

    Returns:
        fp32 tensor of ``q``'s shape: ``q * scale_inv`` over each tile.

    Raises:
        ValueError: ``scale_inv``'s shape does not fit ``q`` and ``block``.
    """
    block = _check_block(block)
    q2d = _as_2d(q, block, "q")
    rows, cols = q2d.shape
    s2d = _scale_inv_2d(scale_inv, rows, cols, block)
    tiles = _tiled(q2d.float(), block) * s2d[:, None, :, None]
    return _untiled(tiles, rows, cols).reshape(q.shape)


def fake_quantize(
    x: torch.Tensor,
    block: Block = (1, 128),
    fmt: str = "e4m3",
    *,
    power_of_2_scales: bool = True,
    amax_epsilon: float = 0.0,
    check_finite: bool = True,
    name: str = "tensor",
) -> torch.Tensor:
    """Quantises and dequantises ``x``: the values an FP8 GEMM would see.

    Args:
        x: As for ``quantize_blockwise``.
        block: As for ``quantize_blockwise``.
        fmt: As for ``quantize_blockwise``.
        power_of_2_scales: As for ``quantize_blockwise``.
        amax_epsilon: As for ``quantize_blockwise``.
        check_finite: As for ``quantize_blockwise``.
        name: As for ``quantize_blockwise``.

    Returns:
        Tensor of ``x``'s shape and dtype. The cast back is exact for fp32 and bf16
        (an FP8 value times a power of two fits their mantissa and exponent range).
    """
    q, scale_inv = quantize_blockwise(
        x,
        block,
        fmt,
        power_of_2_scales=power_of_2_scales,
        amax_epsilon=amax_epsilon,
        check_finite=check_finite,
        name=name,
    )
    return dequantize_blockwise(q, scale_inv, block).to(x.dtype)


def transpose_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: Block = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transposes a weight quantised in square blocks without re-quantising it.

    A square block covers the same elements read row-wise or column-wise, so the
    transpose keeps every FP8 code and scale: ``dequantize(*transpose(q, s))`` equals
    ``dequantize(q, s).T`` exactly. This is what lets Ling build the transposed weight
    for the backward GEMM on demand instead of caching it. 1 x K tiles have no such
    property; a column-wise copy of an activation must be quantised again from the high
    precision tensor (``quantize_blockwise(x.T)``), which is what TE does.

    Args:
        q: 2-D FP8 data quantised with ``block``.
        scale_inv: Its per-block inverse scales.
        block: The (square) block shape.

    Returns:
        ``(q.T, scale_inv.T)``, both contiguous.

    Raises:
        ValueError: For a non-square block, non-2-D ``q`` or mismatched ``scale_inv``.
    """
    block = _check_block(block)
    if block[0] != block[1]:
        raise ValueError(
            f"only square blocks transpose losslessly, got {block[0]}x{block[1]}; "
            f"re-quantize the transposed high-precision tensor instead"
        )
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D, got shape {tuple(q.shape)}")
    _scale_inv_2d(scale_inv, q.shape[0], q.shape[1], block)
    return q.t().contiguous(), scale_inv.t().contiguous()


def quantization_error_bound(
    x: torch.Tensor,
    scale_inv: torch.Tensor,
    block: Block = (1, 128),
    fmt: str = "e4m3",
) -> torch.Tensor:
    """Per-element bound on ``|x - dequantize(quantize(x))|``: half an FP8 step.

    For power-of-2 scales the bound is exact (attained by values half-way between two
    FP8 neighbours): with ``y = |x| / scale_inv`` and ``e = max(floor(log2 y), e_min)``
    it is ``2^(e - m - 1) * scale_inv``, or ``y - fp8_max`` in x's units if that is
    larger (saturation). It never exceeds ``max(|x| * 2^-(m+1), 2^(e_min-m-1) *
    scale_inv)``: for E4M3, ``max(|x| / 16, scale_inv / 1024)``. For scales that are
    not powers of two a relative slack of 2^-21 covers the fp32 rounding of the scale
    multiply and of the dequantisation.

    Args:
        x: The tensor that was quantised (finite values).
        scale_inv: The inverse scales ``quantize_blockwise`` returned for it.
        block: The tile shape used.
        fmt: The FP8 format used.

    Returns:
        float64 tensor of ``x``'s shape (float64 so the bound is not itself rounded).
    """
    fp8 = get_fp8_format(fmt)
    block = _check_block(block)
    x2d = _as_2d(x.detach(), block, "x")
    rows, cols = x2d.shape
    s2d = _scale_inv_2d(scale_inv, rows, cols, block)
    s_elem = s2d.double().repeat_interleave(block[0], 0)
    s_elem = s_elem.repeat_interleave(block[1], 1)[:rows, :cols]
    mag = x2d.double().abs()
    y = mag / s_elem
    exponent = torch.floor(torch.log2(y)).clamp_min(fp8.min_normal_exponent)
    half_step = torch.exp2(exponent - (fp8.mantissa_bits + 1))
    bound = torch.maximum(half_step, y - fp8.max) * s_elem
    mantissa, _ = torch.frexp(s2d)
    if not bool((mantissa == 0.5).all()):
        bound = bound + (mag + bound) * 2.0**-21
    return bound.reshape(x.shape)
