"""Build the training run's megatron optimizer, with the inner Adam the config asks for."""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.ling.mcore_config import build_optimizer_config
from ling_pretrain.optim.adam8bit import use_adam8bit


def build_optimizer(cfg: Any, model: list) -> Any:
    """megatron's optimizer over ``model`` (DDP-wrapped chunks).

    megatron-core builds its distributed (or mixed-precision) optimizer around a torch Adam;
    with ``optimizer.optimizer=adam8bit`` that inner Adam is replaced by
    :class:`~ling_pretrain.optim.adam8bit.Adam8bit` before the first step, so the 8-bit
    moments live beside megatron's fp32 main-parameter shards and everything else (gradient
    reduction, clipping, parameter gather, checkpoint layout) stays megatron's.
    """
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(build_optimizer_config(cfg), model)
    if cfg.optimizer.optimizer == "adam8bit":
        use_adam8bit(optimizer)
    return optimizer
