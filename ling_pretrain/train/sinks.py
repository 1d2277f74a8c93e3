"""Where metrics records go: the console, ``metrics.jsonl``, TensorBoard and W&B, each a
:class:`Sink` with ``log(record, step)`` and ``close()``.

A record is a flat dict of one logged step (``step``, ``loss``, ``mtp_loss``, ``z_loss``,
``val_loss``, throughput and memory figures, ...); values are numbers, None, booleans, or
dicts of numbers keyed by layer (the per-layer expert load). Every sink receives the same
records, on rank 0 only, and is independent of the others: :class:`~.metrics.MetricsWriter`
fans records out and drops (with a warning) a sink that fails, so a broken logger never
stops training.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import statistics
from collections import deque
from typing import Any

logger = logging.getLogger(__name__)

# Console: (field, format) in the order they appear; absent or None fields are left out.
_CONSOLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", "loss {:.4f}"),
    ("mtp_loss", "mtp {:.4f}"),
    ("val_loss", "val {:.4f}"),
    ("lr", "lr {:.3e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("expert_load_max_violation", "maxvio {:.2f}"),
    ("tokens_per_sec", "tok/s {:,.0f}"),
    ("tokens_per_sec_per_device", "tok/s/dev {:,.0f}"),
    ("tflops_per_device", "TFLOP/s/dev {:.3g}"),
    ("mfu", "MFU {:.1%}"),
    ("mfu_fp8", "MFU(fp8) {:.1%}"),
    ("step_time", "{:.2f}s/step"),
    ("data_wait_time", "data {:.3f}s"),
)

# TensorBoard / W&B tag groups; fields not listed go under "train/".
_GROUPS: dict[str, str] = {
    "val_loss": "val/loss",
    "tokens": "progress/tokens",
    "tokens_per_sec": "throughput/tokens_per_sec",
    "tokens_per_sec_per_device": "throughput/tokens_per_sec_per_device",
    "tflops_per_device": "throughput/tflops_per_device",
    "mfu": "throughput/mfu",
    "mfu_fp8": "throughput/mfu_fp8",
    "step_time": "time/step_time",
    "data_wait_time": "time/data_wait_time",
    "max_memory_bytes": "memory/max_memory_bytes",
    "max_memory_reserved_bytes": "memory/max_memory_reserved_bytes",
    "expert_load_max_violation": "moe/expert_load_max_violation",
    "expert_load_max": "moe/expert_load_max",
    "expert_load_min": "moe/expert_load_min",
}


def scalars(record: dict) -> dict[str, float]:
    """The record as ``tag -> number`` (``train/loss``, ``val/loss``, ...); per-layer dicts
    become one tag per layer (``moe/expert_load_max/layer_02``); None is left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        tag = _GROUPS.get(key, f"train/{key}")
        if isinstance(value, dict):
            for layer, v in value.items():
                if v is not None:
                    name = f"layer_{int(layer):02d}" if str(layer).isdigit() else str(layer)
                    out[f"{tag}/{name}"] = float(v)
        elif isinstance(value, (int, float)):
            out[tag] = float(value)
    return out


class Sink(abc.ABC):
    """One destination of metrics records."""

    @abc.abstractmethod
    def log(self, record: dict, step: int) -> None:
        """Write the record of ``step``."""

    def close(self) -> None:  # noqa: B027 (most sinks hold nothing)
        """Flush and release what the sink holds (called once, at the end of the run)."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ConsoleSink(Sink):
    """One log line per record, with an ETA: steps left x the median step time so far
    (training time per step, data wait included; evaluation and checkpoints not)."""

    def __init__(self, max_steps: int, window: int = 50) -> None:
        self.max_steps = max_steps
        self._times: deque[float] = deque(maxlen=window)

    def eta(self, record: dict) -> float | None:
        """Seconds left at ``record``'s step, or None before any timed step."""
        per_step = (record.get("step_time") or 0.0) + (record.get("data_wait_time") or 0.0)
        if per_step > 0:
            self._times.append(per_step)
        if not self._times:
            return None
        return max(self.max_steps - record["step"], 0) * statistics.median(self._times)

    def log(self, record: dict, step: int) -> None:
        parts = [f"step {step:>6}/{self.max_steps}"]
        for key, fmt in _CONSOLE_FIELDS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not (
                isinstance(value, float) and math.isnan(value)
            ):
                parts.append(fmt.format(value))
        memory = record.get("max_memory_bytes")
        if memory:
            parts.append(f"mem {memory / 2**30:.1f} GiB")
        eta = self.eta(record)
        if eta is not None and step < self.max_steps:
            parts.append(f"eta {_duration(eta)}")
        logger.info(" | ".join(parts))


class JsonlSink(Sink):
    """``metrics.jsonl``: one JSON object per logged step.

    A run that starts at ``resume_step`` first drops the lines of later steps (a resumed run
    repeats them; a fresh start, step 0, drops all), so the file holds one line per step
    across resumes.
    """

    def __init__(self, path: str, resume_step: int = 0) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            self._truncate_after(resume_step)
        self._file = open(path, "a")

    def _truncate_after(self, step: int) -> None:
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, record: dict, step: int) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Sink):
    """TensorBoard event files in ``log_dir``; every number of a record is a scalar.

    A resumed run purges the events of steps after ``resume_step`` that an earlier run
    wrote, as ``metrics.jsonl`` drops its lines.
    """

    def __init__(self, log_dir: str, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=resume_step + 1)

    def log(self, record: dict, step: int) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class WandbSink(Sink):
    """A Weights & Biases run (``WANDB_MODE=offline`` writes it locally)."""

    def __init__(self, project: str, name: str, directory: str, config: dict) -> None:
        import wandb

        self._run = wandb.init(
            project=project, name=name, dir=directory, config=config, resume="allow"
        )

    def log(self, record: dict, step: int) -> None:
        self._run.log(scalars(record), step=step)

    def close(self) -> None:
        self._run.finish()


class CollectSink(Sink):
    """Keeps the records in memory (benchmarks read them after the run)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, record: dict, step: int) -> None:
        self.records.append(dict(record))


def build_sinks(cfg: Any, output_dir: str, resume_step: int = 0) -> list[Sink]:
    """The sinks ``cfg.logging`` asks for: console and ``metrics.jsonl`` always, TensorBoard
    (``logging.tensorboard``) and W&B (``logging.wandb``) when on."""
    from omegaconf import OmegaConf

    sinks: list[Sink] = [
        ConsoleSink(cfg.trainer.max_steps),
        JsonlSink(os.path.join(output_dir, "metrics.jsonl"), resume_step),
    ]
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(os.path.join(output_dir, "tensorboard"), resume_step))
    if cfg.logging.wandb:
        sinks.append(
            WandbSink(
                cfg.logging.wandb_project,
                cfg.run.name,
                output_dir,
                OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return sinks
