"""Checks of the ``fp8`` group: settings that contradict each other, and what a recipe needs
from the machine (recipe properties come from :mod:`ling_pretrain.core.recipes`)."""

from __future__ import annotations

import logging
from typing import Any

from ling_pretrain.core.recipes import RECIPES
from ling_pretrain.runtime.hardware import Hardware, version_tuple

logger = logging.getLogger(__name__)

TE_ON_DEMAND_TRANSPOSE = (2, 4)
"""Oldest TransformerEngine release read whose blockwise weights rebuild their column-wise
copy from the row-wise one in the backward (``update_usage`` -> ``_create_columnwise``)."""


def check_fp8(cfg: Any, errors: list[str]) -> None:
    """FP8 settings that contradict each other (no hardware needed)."""
    f, n = cfg.fp8, cfg.model.num_layers
    if f.recipe not in RECIPES:
        errors.append(
            f"fp8.recipe={f.recipe!r} is not a recipe; choose one of {', '.join(RECIPES)} "
            "(fp8=<name> on the command line)."
        )
        return
    if f.emulate and not RECIPES[f.recipe].is_fp8:
        errors.append(
            "fp8.emulate=true with fp8.recipe=bf16 has no FP8 GEMMs to emulate; choose a recipe "
            "(e.g. fp8=blockwise fp8.emulate=true) or drop fp8.emulate."
        )
    start, end = f.num_layers_at_start_in_bf16, f.num_layers_at_end_in_bf16
    if start < 0 or end < 0:
        errors.append(
            f"fp8.num_layers_at_start_in_bf16={start} and fp8.num_layers_at_end_in_bf16={end} "
            "must be >= 0."
        )
    elif f.first_last_layers_bf16 and start + end > n:
        errors.append(
            f"fp8.num_layers_at_start_in_bf16 + num_layers_at_end_in_bf16 = {start + end} "
            f"exceeds model.num_layers={n}."
        )


def check_fp8_hardware(cfg: Any, hw: Hardware, errors: list[str]) -> None:
    """What a recipe run on TransformerEngine (not emulated) needs from this machine."""
    f = cfg.fp8
    recipe = RECIPES.get(f.recipe)
    if recipe is None or not recipe.is_fp8 or f.emulate:
        return
    cc = hw.compute_capability or (0, 0)
    if not hw.on_gpu(cfg):
        errors.append(
            f"fp8.recipe={f.recipe} needs an NVIDIA GPU with TransformerEngine; this machine "
            "has no CUDA device. Use fp8=bf16, or fp8.emulate=true to emulate the recipe's "
            "numerics."
        )
    elif not hw.has_transformer_engine:
        errors.append(
            f"fp8.recipe={f.recipe} needs TransformerEngine (pip install "
            "'ling_pretrain[gpu]'); it is not importable."
        )
    elif recipe.min_compute_capability and cc < recipe.min_compute_capability:
        need = ".".join(map(str, recipe.min_compute_capability))
        arch = {"9.0": "Hopper", "10.0": "Blackwell"}.get(need, "a newer GPU")
        errors.append(
            f"fp8.recipe={f.recipe} needs compute capability >= {need} ({arch}); this GPU is "
            f"{hw.compute_capability}."
        )
    else:
        _check_te_options(cfg, hw, errors)


def _check_te_options(cfg: Any, hw: Hardware, errors: list[str]) -> None:
    """FP8 options on the real TransformerEngine path."""
    f = cfg.fp8
    recipe = RECIPES[f.recipe]
    if f.on_demand_transpose:
        fp8_weights = recipe.fp8_primary_weights or f.fp8_param_gather
        if not recipe.weight_blocks_square:
            errors.append(
                f"fp8.on_demand_transpose=true needs weights scaled in 128x128 blocks "
                f"(fp8.recipe=blockwise or blockwise_fp8_params); with fp8.recipe={f.recipe} "
                "TransformerEngine cannot rebuild the transposed weight from the row-wise one. "
                "Set fp8.on_demand_transpose=false."
            )
        elif not fp8_weights:
            errors.append(
                "fp8.on_demand_transpose=true needs FP8 primary weights on TransformerEngine "
                "(fp8.fp8_param_gather=true, or fp8=blockwise_fp8_params): with BF16 weights TE "
                "caches a quantised copy per module that this option does not manage. Turn on "
                "fp8.fp8_param_gather or set fp8.on_demand_transpose=false."
            )
        elif hw.te_version and version_tuple(hw.te_version) < TE_ON_DEMAND_TRANSPOSE:
            need = ".".join(map(str, TE_ON_DEMAND_TRANSPOSE))
            errors.append(
                f"fp8.on_demand_transpose=true needs TransformerEngine >= {need} (its blockwise "
                "tensors rebuild the column-wise copy inside the backward GEMM); this machine has "
                f"{hw.te_version}. Upgrade TransformerEngine or set fp8.on_demand_transpose=false."
            )
    if f.moe_router_padding_for_quantization and not recipe.block_scaled:
        logger.warning(
            "fp8.moe_router_padding_for_quantization=true with fp8.recipe=%s changes the "
            "numbers: the padded tokens are real hidden states (routed with probability 0) and "
            "enter each expert's per-tensor FP8 scale. megatron-core accepts it, and padding "
            "is only number-neutral with the block-scaled recipes (blockwise, mxfp8). Set "
            "fp8.moe_router_padding_for_quantization=false to keep %s numbers independent of "
            "the padding.",
            f.recipe,
            f.recipe,
        )
