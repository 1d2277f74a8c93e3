"""One benchmark point: a short training job timed after warm-up (``launch/benchmark.py run``).

The job is the real trainer (``train.loop.train``) with evaluation, checkpoints and resuming
off and one metrics record per step; the records' throughput fields
(:mod:`ling_pretrain.train.throughput`) are summarised over the steps after the warm-up as
the median and the spread (p10, p90, min, max). The same summary is computed from a
``metrics.jsonl`` for jobs that ran elsewhere (Slurm).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ling_pretrain.config import compose_job
from ling_pretrain.core.io import atomic_write_json
from ling_pretrain.core.outputs import claim_dir, start_in_place

logger = logging.getLogger(__name__)

RUN_KIND = "benchmark run"
RESULT = "result.json"
"""A point's result inside its output directory."""
RUN_DIR = "run"
"""The training run's directory (config, metrics.jsonl, pretrain.log) inside it."""

SUMMARISED = (
    "step_time",
    "data_wait_time",
    "tokens_per_sec",
    "tokens_per_sec_per_device",
    "tflops_per_device",
    "mfu",
    "mfu_fp8",
)
"""Record fields summarised over the timed steps."""


def job_overrides(warmup: int, steps: int, output_dir: str | os.PathLike) -> list[str]:
    """What a benchmark adds to a job's overrides: ``warmup + steps`` steps, a record per
    step, no evaluation, no checkpoints, no resuming, its own run directory."""
    return [
        f"trainer.max_steps={warmup + steps}",
        "trainer.eval_interval=0",
        "logging.log_interval=1",
        "checkpoint.save_interval=0",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=false",
        f"run.output_dir={output_dir}",
    ]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, p10, p90, min and max."""
    v = np.asarray(values, dtype=np.float64)
    p10, median, p90 = np.percentile(v, [10, 50, 90])
    return {
        "median": float(median),
        "p10": float(p10),
        "p90": float(p90),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def summarize(records: list[dict], warmup: int) -> dict[str, Any]:
    """The benchmark figures of a run's per-step records, warm-up steps left out.

    Raises:
        ValueError: no record after the warm-up.
    """
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise ValueError(f"no metrics record after the {warmup} warm-up steps")
    out: dict[str, Any] = {"warmup_steps": warmup, "timed_steps": len(timed)}
    for key in SUMMARISED:
        values = [r[key] for r in timed if r.get(key) is not None]
        out[key] = spread(values) if values else None
    out["max_memory_bytes"] = max(r.get("max_memory_bytes") or 0 for r in records)
    reserved = [
        r["max_memory_reserved_bytes"] for r in records if r.get("max_memory_reserved_bytes")
    ]
    out["max_memory_reserved_bytes"] = max(reserved) if reserved else None
    out["final_loss"] = timed[-1].get("loss")
    return out


def describe(cfg: Any, world_size: int) -> dict[str, Any]:
    """What a point is: model, devices, layout, batch, precision, FLOPs per token."""
    from ling_pretrain.core.layout import derive_layout
    from ling_pretrain.models.registry import get_family

    layout = derive_layout(cfg, world_size)
    return {
        "model": cfg.model.name,
        "devices": world_size,
        "layout": {
            "tp": layout.tp,
            "pp": layout.pp,
            "ep": layout.ep,
            "etp": layout.etp,
            "cp": layout.cp,
            "dp": layout.dp,
            "vpp": layout.vpp,
        },
        "global_batch_size": cfg.trainer.global_batch_size,
        "micro_batch_size": cfg.trainer.micro_batch_size,
        "seq_length": cfg.data.seq_length,
        "params_dtype": cfg.trainer.params_dtype,
        "fp8": cfg.fp8.recipe + (" (emulated)" if cfg.fp8.emulate else ""),
        "mtp_num_layers": cfg.model.mtp_num_layers,
        "flops_per_token": get_family(cfg.model).flops_per_token(cfg.model, cfg.data.seq_length),
    }


def _device(cfg: Any) -> dict[str, Any]:
    import torch

    from ling_pretrain.models.mcore import on_cuda, uses_transformer_engine

    if on_cuda(cfg):
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
    return {
        "device": name,
        "specs": "transformer_engine" if uses_transformer_engine(cfg) else "local",
    }


def run_point(
    overrides: Sequence[str],
    *,
    out_dir: str | os.PathLike,
    warmup: int = 3,
    steps: int = 10,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Train ``warmup + steps`` steps of the job ``overrides`` in this process group (run it
    under torchrun for several processes) and summarise the timed steps.

    ``out_dir`` must be new, empty or a previous benchmark run (replaced with ``overwrite``,
    only the files it wrote); it receives :data:`RESULT` and the run directory. Returns the
    result on rank 0, None on the other ranks.

    Raises:
        ConfigError: the job is invalid, or ``out_dir`` may not be written.
    """
    from ling_pretrain.jobs.validate import validate
    from ling_pretrain.runtime.distributed import world_size_from_env
    from ling_pretrain.train.loop import train
    from ling_pretrain.train.sinks import CollectSink

    if warmup < 0 or steps < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and steps={steps} >= 1")
    out = Path(out_dir).absolute()
    cfg = compose_job([*overrides, *job_overrides(warmup, steps, out / RUN_DIR)])
    world = world_size_from_env()
    validate(cfg, world)  # before the output directory is claimed
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        start_in_place(claim_dir(out, RUN_KIND, overwrite=overwrite), [RESULT, RUN_DIR])
    collector = CollectSink()
    train(cfg, extra_sinks=[collector])
    if not rank0:
        return None
    result = {
        "overrides": list(overrides),
        **describe(cfg, world),
        **_device(cfg),
        **summarize(collector.records, warmup),
    }
    atomic_write_json(out / RESULT, result)
    return result


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """A point's result file."""
    return json.loads(Path(path).read_text())
