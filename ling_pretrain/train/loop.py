"""The training loop: validate, set up, step, log, evaluate, checkpoint."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from ling_pretrain.checkpoint.dist import find_latest, save_checkpoint
from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.core.log import add_log_file
from ling_pretrain.data.gpt import make_loader
from ling_pretrain.jobs.validate import validate
from ling_pretrain.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    world_size_from_env,
)
from ling_pretrain.train import bad_steps, metrics, preempt
from ling_pretrain.train.setup import TrainParts, setup
from ling_pretrain.train.step import eval_step, train_step

logger = logging.getLogger(__name__)


def _write_config(cfg: Any, output_dir: str) -> None:
    atomic_write_text(os.path.join(output_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))


def _evaluate(parts: TrainParts) -> float | None:
    from megatron.core import parallel_state as ps

    if parts.valid_dataset is None:
        return None
    t = parts.cfg.trainer
    # Every evaluation reads the same validation samples, so values are comparable over time.
    iters = [
        make_loader(
            parts.valid_dataset,
            0,
            parts.cfg,
            ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size(),
        )
        for _ in parts.model
    ]
    loss, _ = eval_step(parts, iters, t.eval_iters)
    return loss


def run_training(
    parts: TrainParts,
    writer: metrics.MetricsWriter,
    save_dir: str,
    stop: preempt.StopRequests,
) -> dict:
    """Train from ``parts.state.step`` to ``trainer.max_steps``; returns the last record.

    Raises:
        preempt.Stopped: after a stop on a signal or a deadline, once the checkpoint of the
            current step is complete on every rank.
        bad_steps.TooManyBadSteps: after ``trainer.max_consecutive_bad_steps`` bad steps in
            a row (nothing saved).
    """
    cfg, state, layout = parts.cfg, parts.state, parts.layout
    t, ck = cfg.trainer, cfg.checkpoint
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    record: dict = {}

    def save() -> str:
        start = time.perf_counter()
        path = save_checkpoint(
            save_dir, state, parts.model, parts.optimizer, parts.scheduler, ck.keep_last
        )
        stop.save_done(time.perf_counter() - start)
        return str(path)

    if state.step >= t.max_steps:
        logger.info(
            "already at step %d >= trainer.max_steps=%d: nothing to do", state.step, t.max_steps
        )
        stop.finish(state.step, t.max_steps)
        return record
    # A resumed run's checkpoint of its first step already exists.
    saved_step = state.step if state.step > 0 else None
    policy = bad_steps.BadStepPolicy(t, state.bad_steps)
    window_start, window_steps = time.perf_counter(), 0
    while state.step < t.max_steps:
        if stop.requested(parts.device):
            stop.announce(state.step, saved_step != state.step)
            path = save() if saved_step != state.step else None
            stop.finish(state.step, t.max_steps, path)
            raise preempt.Stopped(state.step, stop.decision.reason)
        step_start = time.perf_counter()
        result = train_step(parts, layout.num_microbatches, state.step + 1, policy)
        state.step += 1
        state.bad_steps = policy.state_dict()
        state.consumed_samples += t.global_batch_size
        state.tokens += tokens_per_step
        window_steps += 1
        mtp = metrics.mtp_loss(layout.num_microbatches, parts.device)
        zl = metrics.z_loss(layout.num_microbatches, parts.device)
        val = None
        if t.eval_interval > 0 and state.step % t.eval_interval == 0:
            val = _evaluate(parts)
        logged = state.step % cfg.logging.log_interval == 0 or state.step == t.max_steps
        if logged or result.skipped:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": state.step,
                "loss": result.loss,
                "mtp_loss": mtp,
                "z_loss": zl,
                "lr": parts.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm,
                "skipped": result.skipped,
                "expert_load_max_violation": parts.step_stats.get("expert_load_max_violation"),
                "tokens": state.tokens,
                "tokens_per_sec": window_steps * tokens_per_step / elapsed,
                "step_time": elapsed / window_steps,
            }
            if val is not None:
                record["val_loss"] = val
            if result.skipped:
                record["skip_reason"] = result.skip_reason
            writer.log(record)
            window_start, window_steps = time.perf_counter(), 0
        stop.step_done(time.perf_counter() - step_start)
        if policy.must_stop():
            bad_steps.give_up(state.step, t.max_steps, policy, find_latest(save_dir), stop)
        if ck.save_interval > 0 and state.step % ck.save_interval == 0 and state.step < t.max_steps:
            save()
            saved_step = state.step
            window_start = time.perf_counter()
    path = save() if ck.save_at_end else None
    stop.finish(state.step, t.max_steps, path)
    return record


def train(cfg: Any) -> dict:
    """Validate ``cfg``, then train on this process's share of the job.

    Returns the last logged metrics record (the same on every rank).
    """
    layout = validate(cfg, world_size_from_env())
    output_dir = cfg.run.output_dir
    save_dir = cfg.checkpoint.save_dir or os.path.join(output_dir, "checkpoints")
    # Before anything slow and before data-loader workers start: a SIGTERM that Slurm sends to
    # every process of a step must kill neither this process nor its data-loader workers.
    installed = preempt.install_signal_handlers()
    preempt.keep_data_workers_alive()
    info = init_distributed(cfg)
    try:
        if info.rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            add_log_file(os.path.join(output_dir, "pretrain.log"))
            _write_config(cfg, output_dir)
            logger.info(
                "%s on %d process(es): TP=%d PP=%d EP=%d CP=%d DP=%d VPP=%s, %d micro-batch(es) "
                "per step, device %s",
                cfg.model.name,
                layout.world_size,
                layout.tp,
                layout.pp,
                layout.ep,
                layout.cp,
                layout.dp,
                layout.vpp,
                layout.num_microbatches,
                info.device.type,
            )
        parts = setup(cfg, layout, info.device, save_dir)
        if cfg.checkpoint.seed_checkpoint:
            path = save_checkpoint(save_dir, parts.state, parts.model)
            logger.info("seed checkpoint written to %s", path)
            dist.barrier()
            return {}
        writer = metrics.MetricsWriter(output_dir, cfg, resume_step=parts.state.step)
        stop = preempt.StopRequests(cfg, output_dir, info.rank)
        try:
            record = run_training(parts, writer, save_dir, stop)
        finally:
            writer.close()
        dist.barrier()
        return record
    finally:
        # No collective here: after an error on one rank the others may be inside one, and a
        # barrier would turn the error into a hang. torchrun stops the remaining ranks.
        destroy_distributed()
        if installed:
            preempt.restore_signal_handlers()
