"""RMSNorm for the local (non-TransformerEngine) layer specs.

megatron's local spec uses ``torch.nn.RMSNorm`` behind a wrapper that refuses sequence
parallelism, because under sequence parallelism each tensor-parallel rank normalises a
different slice of the sequence and the norm weight's gradient must be summed across ranks.
megatron's ``finalize_model_grads`` does that sum for every parameter tagged
``sequence_parallel``; this norm tags its weight, which makes MoE + TP (where sequence
parallelism is mandatory) work without TransformerEngine.

Numerics follow the Ling 2.0 HF implementation: normalise in fp32, cast back to the input
dtype, then scale by the weight.
"""

from __future__ import annotations

from typing import Any

import torch


class RMSNorm(torch.nn.Module):
    """``y = weight * (x / sqrt(mean(x^2) + eps))`` computed in fp32.

    Args:
        config: megatron ``TransformerConfig`` (for ``sequence_parallel`` and ``params_dtype``).
        hidden_size: size of the normalised (last) dimension.
        eps: epsilon added to the mean square.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any):
        super().__init__()
        self.eps = eps
        device = None if torch.cuda.is_available() and not config.use_cpu_initialization else "cpu"
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
