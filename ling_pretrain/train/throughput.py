"""Per-step speed, model FLOP/s, MFU and memory, as Megatron-LM and Megatron-Bridge report them.

What is timed: a step starts when the loop asks for its batch and ends after the step's
metrics are reduced (the loss and the logged values are read back, so on GPUs the step's
kernels have finished). Evaluation and checkpointing happen outside it. The time spent
waiting for the data loader inside the step (``next()`` on the training iterators) is
measured on its own and taken out of ``step_time``.

* ``step_time``: seconds per step, data wait excluded; ``data_wait_time``: seconds per step
  waiting for batches (rank 0's);
* ``tokens_per_sec`` (the job) and ``tokens_per_sec_per_device``: tokens of the global batch
  over ``step_time + data_wait_time`` (a loader that cannot keep up costs throughput, as in
  Megatron-LM's "elapsed time per iteration");
* ``tflops_per_device``: model FLOPs (Megatron-LM's convention, :mod:`ling_pretrain.models.flops`)
  per device per second at the same time base;
* ``mfu``: ``tflops_per_device`` over the device's dense BF16 peak
  (:mod:`ling_pretrain.runtime.peaks`, or ``logging.peak_tflops``), null where unknown;
  ``mfu_fp8``: over the dense FP8 peak, for runs whose GEMMs are FP8 (null otherwise);
* ``max_memory_bytes``: CUDA ``max_memory_allocated`` (``max_memory_reserved_bytes`` beside
  it), or the process's peak RSS on CPU (reserved: null); the maximum over all ranks.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ling_pretrain.core.layout import Layout
from ling_pretrain.core.recipes import get_recipe
from ling_pretrain.models.registry import get_family
from ling_pretrain.runtime.peaks import peak_for

logger = logging.getLogger(__name__)


class WaitClock:
    """Seconds spent in ``next()`` of the iterators it wraps, since the last :meth:`take`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, iterator: Iterator) -> Iterator:
        return _TimedIterator(iterator, self)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class _TimedIterator:
    def __init__(self, iterator: Iterator, clock: WaitClock) -> None:
        self._iterator = iter(iterator)
        self._clock = clock

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._clock.seconds += time.perf_counter() - start


class StepTimer:
    """Training time of the steps since the last :meth:`take`, with the data wait apart."""

    def __init__(self, clock: WaitClock) -> None:
        self._clock = clock
        self._start = 0.0
        self.steps = 0
        self.busy = 0.0
        self.wait = 0.0

    def start(self) -> None:
        self._clock.take()
        self._start = time.perf_counter()

    def stop(self) -> None:
        wait = self._clock.take()
        self.busy += time.perf_counter() - self._start - wait
        self.wait += wait
        self.steps += 1

    def take(self) -> tuple[int, float, float]:
        """(steps, seconds of work, seconds of data wait), then start a new window."""
        out = (self.steps, self.busy, self.wait)
        self.steps, self.busy, self.wait = 0, 0.0, 0.0
        return out


def _device_peaks(cfg: Any, device: torch.device) -> tuple[float | None, float | None]:
    """(BF16 peak, FP8 peak) of this device in TFLOP/s; warns once when a GPU is unknown."""
    override = cfg.logging.peak_tflops
    if device.type != "cuda":
        return (float(override) if override else None), None
    name = torch.cuda.get_device_name(device)
    peak = peak_for(name)
    if peak is None and not override:
        logger.warning(
            "no peak TFLOP/s is known for %s (ling_pretrain/runtime/peaks.py): mfu is null; "
            "set logging.peak_tflops to its dense BF16 peak",
            name,
        )
    bf16 = float(override) if override else (peak.bf16_tflops if peak else None)
    return bf16, (peak.fp8_tflops if peak else None)


def _gemms_in_fp8(cfg: Any) -> bool:
    """Whether the GEMMs run in FP8 (a TE recipe; emulation computes in high precision)."""
    return get_recipe(cfg.fp8.recipe).is_fp8 and not cfg.fp8.emulate


def peak_memory(device: torch.device) -> tuple[int, int | None]:
    """(max allocated, max reserved) bytes of this process's CUDA device, or (peak RSS, None)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), None


class Meter:
    """Turns a window of timed steps into the throughput fields of a metrics record."""

    def __init__(self, cfg: Any, layout: Layout, device: torch.device) -> None:
        self.device = device
        self.devices = layout.world_size
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_length
        self.flops_per_token = get_family(cfg.model).flops_per_token(cfg.model, cfg.data.seq_length)
        self.peak, peak_fp8 = _device_peaks(cfg, device)
        self.peak_fp8 = peak_fp8 if _gemms_in_fp8(cfg) else None

    def figures(self, steps: int, busy: float, wait: float) -> dict[str, Any]:
        """The record fields of ``steps`` steps that took ``busy`` + ``wait`` seconds.

        Collective over the world when there is one (memory is the maximum over ranks).
        """
        allocated, reserved = peak_memory(self.device)
        memory = torch.tensor(
            [allocated, -1 if reserved is None else reserved], dtype=torch.float64
        )
        if dist.is_initialized():
            memory = memory.to(self.device)
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
            memory = memory.cpu()
        steps = max(steps, 1)
        step_time, data_wait = busy / steps, wait / steps
        per_step = max(step_time + data_wait, 1e-12)
        tokens_per_sec = self.tokens_per_step / per_step
        tflops = self.flops_per_token * tokens_per_sec / self.devices / 1e12
        return {
            "tokens_per_sec": tokens_per_sec,
            "tokens_per_sec_per_device": tokens_per_sec / self.devices,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "mfu_fp8": tflops / self.peak_fp8 if self.peak_fp8 else None,
            "step_time": step_time,
            "data_wait_time": data_wait,
            "max_memory_bytes": int(memory[0]),
            "max_memory_reserved_bytes": int(memory[1]) if memory[1] >= 0 else None,
        }
