"""The GPU check (``launch/benchmark.py gpu-check``): what one GPU does in under 8 minutes.

It runs the suite ``conf/benchmark/gpu_check.yaml`` on this machine's first GPU: ling_mini and
Llama-3.1-8B cut to 4 layers, in BF16 (TransformerEngine layer specs when TE is installed,
megatron's local specs otherwise), and ling_mini under emulated blockwise FP8 (and under
real TE FP8 where the GPU and TE allow). It reports tokens/s per GPU, TFLOP/s, MFU and peak
memory per point, and the cost of the FP8 emulation: the emulated point's step time over the
BF16 one's. Points are not started after ``budget_s``; the remaining ones are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ling_pretrain.bench.suite import run_suite
from ling_pretrain.core.errors import ConfigError

SUITE = "gpu_check"
BUDGET_S = 420.0
"""Seconds after which no new point starts (the check must finish within 8 minutes)."""


def _median(result: dict, key: str) -> float | None:
    value = result.get(key)
    return value["median"] if isinstance(value, dict) else None


def summarize_check(results: list[dict]) -> dict[str, Any]:
    """The figures of each point and the FP8 emulation's cost (None where not measured)."""
    points = {
        r["name"]: {
            "status": r["status"],
            **({"reason": r["reason"]} if r.get("reason") else {}),
            "device": r.get("device"),
            "specs": r.get("specs"),
            "tokens_per_sec_per_gpu": _median(r, "tokens_per_sec_per_device"),
            "tflops_per_gpu": _median(r, "tflops_per_device"),
            "mfu": _median(r, "mfu"),
            "step_time_s": _median(r, "step_time"),
            "max_memory_bytes": r.get("max_memory_bytes"),
            "max_memory_reserved_bytes": r.get("max_memory_reserved_bytes"),
        }
        for r in results
    }
    bf16 = points.get("ling_mini_4l_bf16", {}).get("step_time_s")
    emulated = points.get("ling_mini_4l_fp8_emulated", {}).get("step_time_s")
    return {
        "points": points,
        "fp8_emulation_cost": emulated / bf16 if bf16 and emulated else None,
    }


def gpu_check(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    budget_s: float = BUDGET_S,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the GPU check into ``out_dir`` (see :func:`~.suite.run_suite`).

    Raises:
        ConfigError: no CUDA GPU is visible (nothing is written).
    """
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "gpu-check needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
            "False); nothing was run, and its results stay 'not measured'."
        )
    results = run_suite(SUITE, out_dir, overwrite=overwrite, budget_s=budget_s, log=log)
    return summarize_check(results)
