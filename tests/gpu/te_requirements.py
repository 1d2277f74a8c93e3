"""What the TransformerEngine GPU tests need, and why they skip when it is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def why_no_te_blockwise() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Hopper) with TransformerEngine; this machine has no CUDA device"
    if importlib.util.find_spec("transformer_engine") is None:
        return "needs TransformerEngine (pip install 'ling_pretrain[gpu]'); it is not importable"
    cap = torch.cuda.get_device_capability(0)
    if cap < (9, 0):
        return f"blockwise FP8 needs compute capability >= 9.0 (Hopper), this GPU has {cap}"
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return f"blockwise FP8 needs CUDA >= 12.9, PyTorch was built with {torch.version.cuda}"
    return None


def te_blockwise_marks() -> list:
    """``pytestmark`` for a module that needs a Hopper GPU with TE's blockwise FP8."""
    reason = why_no_te_blockwise()
    return [pytest.mark.gpu, pytest.mark.skipif(reason is not None, reason=str(reason))]
