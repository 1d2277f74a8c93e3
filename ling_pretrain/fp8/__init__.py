"""FP8 numerics: an exact CPU emulation of TransformerEngine's blockwise FP8 recipe.

``quantize`` holds the tile-wise quantisation (1 x 128 tiles, 128 x 128 blocks,
power-of-2 scales, E4M3/E5M2) and its error bound; ``emulation`` builds an FP8 linear
layer from it whose forward, dgrad and wgrad GEMMs see the operands TE's kernels would.
"""

from ling_pretrain.fp8.emulation import (
    FP8EmulatedLinear,
    FP8EmulationSpec,
    FP8EmulationStats,
    emulated_linear,
    fp8_emulation_stats,
    fp8_emulation_totals,
)
from ling_pretrain.fp8.quantize import (
    FP8Format,
    dequantize_blockwise,
    fake_quantize,
    get_fp8_format,
    quantization_error_bound,
    quantize_blockwise,
    raise_if_nonfinite,
    transpose_blockwise,
)

__all__ = [
    "FP8EmulatedLinear",
    "FP8EmulationSpec",
    "FP8EmulationStats",
    "FP8Format",
    "dequantize_blockwise",
    "emulated_linear",
    "fake_quantize",
    "fp8_emulation_stats",
    "fp8_emulation_totals",
    "get_fp8_format",
    "quantization_error_bound",
    "quantize_blockwise",
    "raise_if_nonfinite",
    "transpose_blockwise",
]
