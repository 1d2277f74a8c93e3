"""Optimizers beyond megatron-core's own: blockwise 8-bit Adam (see :mod:`.adam8bit`)."""

from ling_pretrain.optim.adam8bit import (
    MIN_8BIT_NUMEL,
    Adam8bit,
    fp32_moments,
    inner_optimizers,
    use_adam8bit,
)

__all__ = ["MIN_8BIT_NUMEL", "Adam8bit", "fp32_moments", "inner_optimizers", "use_adam8bit"]
