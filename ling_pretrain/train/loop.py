"""The training loop: validate, set up, step, log, evaluate, checkpoint, report."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import torch.distributed as dist
from omegaconf import OmegaConf

from ling_pretrain.checkpoint.dist import find_latest, save_checkpoint
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.core.log import add_log_file
from ling_pretrain.data.gpt import make_loader
from ling_pretrain.jobs.resume import choose_checkpoint, save_dir_of
from ling_pretrain.jobs.validate import validate
from ling_pretrain.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    world_size_from_env,
)
from ling_pretrain.train import bad_steps, metrics, preempt, report, throughput
from ling_pretrain.train.setup import TrainParts, setup
from ling_pretrain.train.sinks import Sink
from ling_pretrain.train.step import eval_step, train_step

logger = logging.getLogger(__name__)


def _write_config(cfg: Any, output_dir: str) -> None:
    atomic_write_text(os.path.join(output_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))


def _nothing_to_do(cfg: Any, step: int, rank: int) -> dict:
    """A start of a run that has reached ``trainer.max_steps``: nothing is built or written
    but the status file."""
    if rank == 0:
        logger.info(
            "already at step %d >= trainer.max_steps=%d: nothing to do (%s/config.yaml still "
            "describes its checkpoints). To train on, raise trainer.max_steps; for another run "
            "choose another run.output_dir.",
            step,
            cfg.trainer.max_steps,
            cfg.run.output_dir,
        )
    preempt.StopRequests(cfg, cfg.run.output_dir, rank).finish(step, cfg.trainer.max_steps)
    return {}


def _refused(cfg: Any, rank: int, err: ConfigError, step: int = 0) -> NoReturn:
    """A start refused after validation (a damaged checkpoint with on_damaged=error, optimizer
    state this layout cannot load): rank 0 records it in the status file, so that
    ``pretrain.sbatch`` does not requeue a job that would fail the same way, and the error
    goes on to the command line's one message. Not collective: another rank may not be here."""
    stop = preempt.StopRequests(cfg, cfg.run.output_dir, rank)
    failure = (preempt.EXIT_REFUSED, "refused at start-up (the log says why)")
    stop.finish(step, cfg.trainer.max_steps, failure=failure, collective=False)
    raise err


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

    saver = parts.checkpointer

    def save(wait: bool = True) -> str:
        start = time.perf_counter()
        path = saver.save(state, parts.model, parts.optimizer, parts.scheduler, wait=wait)
        stop.save_done(max(time.perf_counter() - start, saver.slowest_seconds))
        return str(path)

    if state.step >= t.max_steps:
        logger.info(
            "already at step %d >= trainer.max_steps=%d: nothing to do", state.step, t.max_steps
        )
        stop.finish(state.step, t.max_steps)
        return record
    # A resumed run's checkpoint of its first step already exists.
    saved_step = state.step if state.step > 0 else None
    # Steps are timed from their batch to their reduced metrics: evaluation and checkpoints
    # fall outside, and the data wait is measured apart (train.throughput).
    meter = throughput.Meter(cfg, layout, parts.device)
    timer = throughput.StepTimer(parts.data_clock)
    policy = bad_steps.BadStepPolicy(t, state.bad_steps)
    while state.step < t.max_steps:
        saver.poll()
        if stop.requested(parts.device):
            stop.announce(state.step, saved_step != state.step)
            path = save() if saved_step != state.step else None
            saver.wait()
            stop.finish(state.step, t.max_steps, path)
            raise preempt.Stopped(state.step, stop.decision.reason)
        step_start = time.perf_counter()
        timer.start()
        result = train_step(parts, layout.num_microbatches, state.step + 1, policy)
        state.step += 1
        state.bad_steps = policy.state_dict()
        state.consumed_samples += t.global_batch_size
        state.tokens += tokens_per_step
        mtp = metrics.mtp_loss(layout.num_microbatches, parts.device)
        zl = metrics.z_loss(layout.num_microbatches, parts.device)
        timer.stop()
        val = None
        if t.eval_interval > 0 and state.step % t.eval_interval == 0:
            val = _evaluate(parts)
        logged = state.step % cfg.logging.log_interval == 0 or state.step == t.max_steps
        if logged or result.skipped:
            stats = parts.step_stats
            record = {
                "step": state.step,
                "loss": result.loss,
                "mtp_loss": mtp,
                "z_loss": zl,
                "lr": parts.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm,
                "skipped": result.skipped,
                "expert_load_max_violation": stats.get("expert_load_max_violation"),
                "expert_load_max": stats.get("expert_load_max"),
                "expert_load_min": stats.get("expert_load_min"),
                "tokens": state.tokens,
                **meter.figures(*timer.take()),
            }
            if val is not None:
                record["val_loss"] = val
            if result.skipped:
                record["skip_reason"] = result.skip_reason
            writer.log(record)
        stop.step_done(time.perf_counter() - step_start)
        if policy.must_stop():
            saver.wait()  # a checkpoint still being written counts once it is complete
            bad_steps.give_up(state.step, t.max_steps, policy, find_latest(save_dir), stop)
        if ck.save_interval > 0 and state.step % ck.save_interval == 0 and state.step < t.max_steps:
            save(wait=False)
            saved_step = state.step
    path = save() if ck.save_at_end else None
    saver.wait()
    stop.finish(state.step, t.max_steps, path)
    return record


def train(cfg: Any, extra_sinks: Sequence[Sink] = ()) -> dict:
    """Validate ``cfg``, then train on this process's share of the job.

    ``extra_sinks`` receive every metrics record on rank 0, besides the configured ones.
    Returns the last logged metrics record (the same on every rank).
    """
    layout = validate(cfg, world_size_from_env())
    output_dir = cfg.run.output_dir
    save_dir = str(save_dir_of(cfg))
    # Before anything slow and before data-loader workers start: a SIGTERM that Slurm sends to
    # every process of a step must kill neither this process nor its data-loader workers.
    installed = preempt.install_signal_handlers()
    preempt.keep_data_workers_alive()
    info = init_distributed(cfg)
    try:
        if info.rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            add_log_file(os.path.join(output_dir, "pretrain.log"))
        try:
            source = choose_checkpoint(cfg)
        except ConfigError as err:
            _refused(cfg, info.rank, err)
        if source is not None and source.step >= cfg.trainer.max_steps:
            return _nothing_to_do(cfg, source.step, info.rank)
        if info.rank == 0:
            if source is None:  # a resumed run's config.yaml follows its checkpoints
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
        try:
            parts = setup(cfg, layout, info.device, save_dir, source)
        except ConfigError as err:
            _refused(cfg, info.rank, err, source.step if source is not None else 0)
        if cfg.checkpoint.seed_checkpoint:
            path = save_checkpoint(save_dir, parts.state, parts.model, config=cfg)
            logger.info("seed checkpoint written to %s", path)
            dist.barrier()
            return {}
        first_step, started = parts.state.step, time.perf_counter()
        writer = metrics.MetricsWriter(
            output_dir, cfg, resume_step=parts.state.step, extra_sinks=extra_sinks
        )
        stop = preempt.StopRequests(cfg, output_dir, info.rank)
        try:
            record = run_training(parts, writer, save_dir, stop)
        finally:
            writer.close()
        if info.rank == 0 and parts.state.step > first_step:
            report.finish(
                cfg, output_dir, save_dir, first_step, parts.state, time.perf_counter() - started
            )
        dist.barrier()
        return record
    finally:
        # No collective here: after an error on one rank the others may be inside one, and a
        # barrier would turn the error into a hang. torchrun stops the remaining ranks.
        destroy_distributed()
        if installed:
            preempt.restore_signal_handlers()
