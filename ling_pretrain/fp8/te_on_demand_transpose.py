"""On-demand transpose of FP8 primary weights on TransformerEngine (GPU only; not yet run).

With FP8 primary weights (``fp8.fp8_param_gather``) and TE's ``Float8BlockScaling`` every
linear weight is a ``Float8BlockwiseQTensor`` holding two FP8 copies: the row-wise one
(``_rowwise_data`` + ``_rowwise_scale_inv``), read by the forward GEMM, and the column-wise
one (``_columnwise_data`` + ``_columnwise_scale_inv``, the transpose), read by the dgrad GEMM.
Weights are scaled in 128x128 blocks (``_is_2D_scaled``), so the column-wise copy is exactly
the row-wise one transposed, data and scales alike. Released TE (read in 2.4, 2.6, 2.8, 2.10
and 2.20.2) already knows this:

* ``update_usage(rowwise_usage=True, columnwise_usage=False)`` drops the column-wise copy;
* ``update_usage(columnwise_usage=True)`` rebuilds it from the row-wise data
  (``_create_columnwise``: ``tex.fp8_transpose`` of the data, the scales transposed) when it
  is missing, and TE's ``Linear`` / ``LayerNormLinear`` / ``GroupedLinear`` backward calls it
  right before the dgrad GEMM.

What keeps the copy alive in a stock run is megatron-core: after every parameter all-gather
(that is, after every optimizer step) it calls ``post_all_gather_processing``, which builds
the column-wise copy of every blockwise weight, and nothing frees it after the backward. So
:func:`install` does two things, and leaves TE's kernels alone:

1. megatron's ``post_all_gather_processing`` leaves 2D-scaled blockwise weights row-wise
   only (other tensors go through unchanged);
2. a hook on every TE module that holds such weights frees their column-wise copy when the
   gradient of the module's input is ready, i.e. after the module's dgrad GEMM, and at the
   start of its forward (for paths where megatron copied master weights into both copies,
   e.g. without the distributed optimizer).

Numerically nothing changes: the column-wise copy is always the transpose of the current
row-wise data, whether megatron or the backward built it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

_MEGATRON_CALLERS = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
)


def is_2d_blockwise(tensor: Any) -> bool:
    """Whether ``tensor`` is a TE blockwise FP8 tensor scaled in 128x128 blocks."""
    return bool(getattr(tensor, "_is_2D_scaled", False)) and hasattr(tensor, "_create_columnwise")


def has_columnwise_copy(tensor: Any) -> bool:
    """Whether a TE blockwise FP8 tensor currently holds its column-wise (transposed) copy."""
    return getattr(tensor, "_columnwise_data", None) is not None


def drop_columnwise(tensors: Any) -> None:
    """Free the column-wise copy of each 2D-scaled blockwise tensor (row-wise data stays)."""
    for t in tensors:
        if is_2d_blockwise(t) and has_columnwise_copy(t):
            t.update_usage(rowwise_usage=True, columnwise_usage=False)


def _rowwise_only(original):
    @functools.wraps(original)
    def post_all_gather_processing(model_params):
        params = model_params if isinstance(model_params, list) else [model_params]
        blockwise = [p for p in params if is_2d_blockwise(p)]
        drop_columnwise(blockwise)
        rest = [p for p in params if not is_2d_blockwise(p)]
        if rest:
            original(rest)

    post_all_gather_processing.ling_on_demand_transpose = True
    return post_all_gather_processing


def _patch_megatron() -> None:
    import importlib

    for name in _MEGATRON_CALLERS:
        module = importlib.import_module(name)
        fn = getattr(module, "post_all_gather_processing", None)
        if fn is not None and not getattr(fn, "ling_on_demand_transpose", False):
            module.post_all_gather_processing = _rowwise_only(fn)


def _install_on_module(module: torch.nn.Module, weights: list) -> None:
    def free(_grad):
        drop_columnwise(weights)

    def pre_forward(_module, _args):
        drop_columnwise(weights)

    def post_forward(_module, args, _output):
        inp = args[0] if args else None
        if isinstance(inp, torch.Tensor) and inp.requires_grad and torch.is_grad_enabled():
            inp.register_hook(free)

    module.register_forward_pre_hook(pre_forward)
    module.register_forward_hook(post_forward)


def install(model_chunks: list) -> int:
    """Turn on on-demand transpose for every TE module holding 2D-scaled FP8 weights.

    Args:
        model_chunks: the model chunks (before or after DDP wrapping).

    Returns:
        The number of modules hooked (0 when the model holds no blockwise FP8 weights).
    """
    hooked = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            weights = [p for p in module.parameters(recurse=False) if is_2d_blockwise(p)]
            if weights:
                _install_on_module(module, weights)
                drop_columnwise(weights)
                hooked += 1
    if hooked:
        _patch_megatron()
    logger.info("on-demand transpose: %d TE modules keep only row-wise FP8 weights", hooked)
    return hooked
