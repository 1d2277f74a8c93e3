"""What the trainer costs over megatron-core itself (``launch/benchmark.py overhead``).

Two loops train the same model, optimizer and data, in one process group, alternately:

* **ours**: ``train.loop.run_training`` as a run executes it, step for step: MTP loss
  weighting, the expert-load statistics and bias rule around gradient finalisation, the
  reduced loss, MTP loss and z-loss, throughput and memory figures, and the console and
  ``metrics.jsonl`` sinks;
* **bare**: what a minimal megatron-core loop does: ``get_forward_backward_func()`` over the
  same micro-batches with a plain forward step and loss, megatron's own
  ``finalize_model_grads``, then ``optimizer.step()`` and the scheduler. No metrics, sinks
  or checks.

Blocks of steps alternate (ours, bare, bare, ours, ...) so that drift of a noisy machine
falls on both; the ratio of the medians of the per-step wall times is the overhead
(``overhead``). The same ratio of this process's CPU time (``cpu_overhead``) is steadier on a
machine shared with other work, and is what to compare for a single CPU process.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ling_pretrain.config import compose_job

logger = logging.getLogger(__name__)


def _bare_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output.float().view(-1) * mask)
    return loss, mask.sum().to(torch.int), {"lm loss": loss.detach()}


def _bare_forward(data_iterator, model):
    device = next(model.parameters()).device
    batch = {
        k: v.to(device, non_blocking=True)
        for k, v in next(data_iterator).items()
        if isinstance(v, torch.Tensor)
    }
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(_bare_loss, batch["loss_mask"])


def _bare_steps(parts: Any, steps: int) -> None:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    cfg = parts.cfg
    config = get_model_config(parts.model[0])
    ours = config.finalize_model_grads_func
    config.finalize_model_grads_func = finalize_model_grads
    try:
        for _ in range(steps):
            for chunk in parts.model:
                chunk.zero_grad_buffer()
            parts.optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=_bare_forward,
                data_iterator=parts.train_iters,
                model=parts.model,
                num_microbatches=parts.layout.num_microbatches,
                seq_length=cfg.data.seq_length,
                micro_batch_size=cfg.trainer.micro_batch_size,
                forward_only=False,
            )
            ok, _, _ = parts.optimizer.step()
            if ok:
                parts.scheduler.step(increment=1)
    finally:
        config.finalize_model_grads_func = ours


def _clear_trackers() -> None:
    """Drop what megatron tracked during bare steps, so our next step logs only its own."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    clear_aux_losses_tracker()
    helper = MTPLossLoggingHelper
    clean = getattr(helper, "clean_metrics_in_tracker", None) or helper.clean_loss_in_tracker
    clean()


def measure_overhead(
    overrides: Sequence[str],
    *,
    steps_per_block: int = 5,
    blocks: int = 6,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time our training step against the bare megatron-core loop; returns the figures.

    Run under torchrun for several processes. One warm-up block of each runs first.
    """
    from ling_pretrain.jobs.validate import validate
    from ling_pretrain.runtime.distributed import (
        destroy_distributed,
        init_distributed,
        is_rank0,
        world_size_from_env,
    )
    from ling_pretrain.train import metrics, preempt
    from ling_pretrain.train.loop import run_training
    from ling_pretrain.train.setup import setup

    if steps_per_block < 1 or blocks < 2:
        raise ValueError("steps_per_block must be >= 1 and blocks >= 2")
    tmp = tempfile.TemporaryDirectory(prefix="ling_overhead_")
    total = (blocks + 1) * steps_per_block * 2
    cfg = compose_job(
        [
            *overrides,
            f"trainer.max_steps={total}",
            "trainer.eval_interval=0",
            "logging.log_interval=1",
            "checkpoint.save_interval=0",
            "checkpoint.save_at_end=false",
            "checkpoint.resume=false",
            f"run.output_dir={tmp.name}",
        ]
    )
    layout = validate(cfg, world_size_from_env())
    info = init_distributed(cfg)
    try:
        parts = setup(cfg, layout, info.device, f"{tmp.name}/checkpoints")
        writer = metrics.MetricsWriter(tmp.name, cfg)
        stop = preempt.StopRequests(cfg, tmp.name, info.rank)

        def ours() -> tuple[float, float]:
            start, cpu = time.perf_counter(), time.process_time()
            cfg.trainer.max_steps = parts.state.step + steps_per_block
            run_training(parts, writer, tmp.name, stop)
            return (
                (time.perf_counter() - start) / steps_per_block,
                (time.process_time() - cpu) / steps_per_block,
            )

        def bare() -> tuple[float, float]:
            start, cpu = time.perf_counter(), time.process_time()
            _bare_steps(parts, steps_per_block)
            seconds = (
                (time.perf_counter() - start) / steps_per_block,
                (time.process_time() - cpu) / steps_per_block,
            )
            _clear_trackers()
            return seconds

        ours(), bare()  # warm-up
        times: dict[str, list[float]] = {"ours": [], "bare": []}
        cpu_times: dict[str, list[float]] = {"ours": [], "bare": []}
        for block in range(blocks):
            order = (ours, bare) if block % 2 == 0 else (bare, ours)
            for fn in order:
                wall, cpu = fn()
                times[fn.__name__].append(wall)
                cpu_times[fn.__name__].append(cpu)
            if is_rank0():
                log(
                    f"block {block + 1}/{blocks}: ours {times['ours'][-1] * 1e3:.1f} ms/step, "
                    f"bare {times['bare'][-1] * 1e3:.1f} ms/step"
                )
        writer.close()
    finally:
        destroy_distributed()
        tmp.cleanup()
    ours_s, bare_s = statistics.median(times["ours"]), statistics.median(times["bare"])
    ours_cpu, bare_cpu = statistics.median(cpu_times["ours"]), statistics.median(cpu_times["bare"])
    return {
        "model": cfg.model.name,
        "processes": layout.world_size,
        "global_batch_size": cfg.trainer.global_batch_size,
        "micro_batch_size": cfg.trainer.micro_batch_size,
        "seq_length": cfg.data.seq_length,
        "steps_per_block": steps_per_block,
        "blocks": blocks,
        "ours_step_s": ours_s,
        "bare_step_s": bare_s,
        "block_ratios": [o / b for o, b in zip(times["ours"], times["bare"], strict=True)],
        "ours_cpu_s": ours_cpu,
        "bare_cpu_s": bare_cpu,
        "cpu_overhead": ours_cpu / bare_cpu,
        "overhead": ours_s / bare_s,
    }
