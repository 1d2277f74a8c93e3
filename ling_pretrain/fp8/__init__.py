"""FP8 numerics: an exact CPU emulation of TransformerEngine's blockwise FP8 recipe.

``quantize`` holds the tile-wise quantisation (1 x 128 tiles, 128 x 128 blocks,
power-of-2 scales, E4M3/E5M2) and its error bound; ``emulation`` builds an FP8 linear
layer from it whose forward, dgrad and wgrad GEMMs see the operands TE's kernels would
(blockwise, tensorwise and MXFP8 rules, one autograd function); ``megatron_linear``
puts that GEMM into megatron-core's parallel linear layers.
"""

import importlib
from typing import Any

# Exports resolve on first use, so importing a light submodule (``memory``) does not pay
# for torch.
_EXPORTS = {
    "BlockwiseEmulation": "emulation",
    "FP8EmulatedLinear": "emulation",
    "FP8EmulationSpec": "emulation",
    "FP8EmulationStats": "emulation",
    "FP8GemmEmulation": "emulation",
    "MXFP8Emulation": "emulation",
    "TensorwiseEmulation": "emulation",
    "emulated_gemm": "emulation",
    "emulated_linear": "emulation",
    "fp8_emulation_stats": "emulation",
    "fp8_emulation_totals": "emulation",
    "FP8Format": "quantize",
    "dequantize_blockwise": "quantize",
    "fake_quantize": "quantize",
    "get_fp8_format": "quantize",
    "quantization_error_bound": "quantize",
    "quantize_blockwise": "quantize",
    "raise_if_nonfinite": "quantize",
    "transpose_blockwise": "quantize",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlockwiseEmulation",
    "FP8EmulatedLinear",
    "FP8EmulationSpec",
    "FP8EmulationStats",
    "FP8Format",
    "FP8GemmEmulation",
    "MXFP8Emulation",
    "TensorwiseEmulation",
    "dequantize_blockwise",
    "emulated_gemm",
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
