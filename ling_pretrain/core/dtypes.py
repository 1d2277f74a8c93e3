"""Parameter dtypes by their config names (``trainer.params_dtype``)."""

from __future__ import annotations

from typing import Any

PARAMS_DTYPES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Config name -> bytes per element."""


def torch_dtype(name: str) -> Any:
    """The torch dtype of a config name (``fp32``, ``bf16``, ``fp16``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
