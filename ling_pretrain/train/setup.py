"""Assemble the parts of a training run into a plain dataclass (no god object)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ling_pretrain.checkpoint import rng
from ling_pretrain.checkpoint.dist import (
    Checkpointer,
    TrainState,
    layout_record,
    load_checkpoint,
    read_train_state,
)
from ling_pretrain.checkpoint.hf.loader import load_hf_into_model
from ling_pretrain.core.layout import Layout
from ling_pretrain.data.gpt import build_datasets, data_cache_dir, make_loader, resolve_data
from ling_pretrain.jobs.resume import Candidate, describe_resume
from ling_pretrain.models.build import build_model
from ling_pretrain.models.registry import get_family
from ling_pretrain.optim.mcore import build_optimizer, build_scheduler
from ling_pretrain.train.ddp import wrap_ddp
from ling_pretrain.train.moe import make_finalize_model_grads
from ling_pretrain.train.throughput import WaitClock

logger = logging.getLogger(__name__)


@dataclass
class TrainParts:
    """Everything the loop uses. Each function takes only the parts it needs."""

    cfg: Any
    layout: Layout
    device: torch.device
    model: list
    optimizer: Any
    scheduler: Any
    state: TrainState
    train_iters: list
    valid_dataset: Any | None
    checkpointer: Checkpointer
    step_stats: dict = field(default_factory=dict)
    """Per-step statistics filled during the step (expert load)."""
    data_clock: WaitClock = field(default_factory=WaitClock)
    """Time spent waiting for training batches (the iterators in ``train_iters``)."""


def _restore(
    cfg: Any, layout: Layout, model: list, optimizer: Any, scheduler: Any, source: Candidate | None
) -> tuple[TrainState, dict | None]:
    """Resume (everything) from ``source``, or initialise (weights only), as the checkpoint
    config says. Returns the state and the RNG states to put back before the first step."""
    ck = cfg.checkpoint
    if source is not None:
        logger.info("resuming from %s", source.path)
        if dist.get_rank() == 0:
            for line in describe_resume(cfg, source):
                logger.warning(line)
        state = load_checkpoint(source.path, model, optimizer, scheduler, verify=False)
        if state.weights_only:
            optimizer.reload_model_params()
            return state, None
        return state, _saved_rng(source, layout)
    if ck.init_from:
        logger.info("initialising weights from %s (fresh optimizer, step 0)", ck.init_from)
        load_checkpoint(ck.init_from, model)
        # The optimizer's fp32 master weights were copied before the load; refresh them.
        optimizer.reload_model_params()
    elif ck.init_from_hf:
        logger.info("initialising weights from HF %s (fresh optimizer, step 0)", ck.init_from_hf)
        load_hf_into_model(ck.init_from_hf, model, cfg, get_family(cfg.model).hf)
        optimizer.reload_model_params()
    return TrainState(), None


def _saved_rng(source: Candidate, layout: Layout) -> dict | None:
    """This rank's RNG states in ``source`` when it was saved at this layout (agreed by every
    rank, which all read the same train_state.json)."""
    saved = read_train_state(source.path).get("layout")
    if saved is None:
        return None
    if saved != layout_record(layout):
        if dist.get_rank() == 0:
            changed = ", ".join(
                f"{k} {saved.get(k)} -> {v}"
                for k, v in layout_record(layout).items()
                if saved.get(k) != v
            )
            logger.warning(
                "resuming at another layout (%s): random-number generators start from "
                "trainer.seed instead of the checkpoint's streams, which belong to its ranks",
                changed,
            )
        return None
    return rng.load(source.path, dist.get_rank())


def setup(
    cfg: Any,
    layout: Layout,
    device: torch.device,
    save_dir: str,
    source: Candidate | None = None,
) -> TrainParts:
    """Build model, optimizer, schedule and data for this rank, restoring ``source`` (a
    verified checkpoint, :func:`ling_pretrain.jobs.resume.choose_checkpoint`) or the weights
    ``checkpoint.init_from`` / ``init_from_hf`` name."""
    from megatron.core import parallel_state as ps

    chunks = build_model(cfg)
    model = wrap_ddp(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)

    config = chunks[0].config
    step_stats: dict = {}
    config.finalize_model_grads_func = make_finalize_model_grads(
        step_stats, device, cfg.model.moe_router_bias_update
    )
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]

    state, rng_states = _restore(cfg, layout, model, optimizer, scheduler, source)

    data = resolve_data(cfg)
    t = cfg.trainer
    train_samples = t.max_steps * t.global_batch_size
    evals = (t.max_steps // t.eval_interval + 1) if t.eval_interval > 0 else 0
    valid_samples = evals * t.eval_iters * t.micro_batch_size * layout.dp
    cache = data_cache_dir(cfg)
    if dist.get_rank() == 0:
        train_ds, valid_ds, _ = build_datasets(cfg, data, (train_samples, valid_samples, 0), cache)
    dist.barrier()
    if dist.get_rank() != 0:
        train_ds, valid_ds, _ = build_datasets(cfg, data, (train_samples, valid_samples, 0), cache)
    if train_ds is None:
        raise ValueError(f"data.split={cfg.data.split!r} leaves no training documents")
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    data_clock = WaitClock()
    train_iters = [
        data_clock.wrap(make_loader(train_ds, state.consumed_samples, cfg, dp_rank, dp_size))
        for _ in model
    ]
    if rng_states is not None:
        # Last: what set-up drew (initialisation, loader seeds) must not shift the streams.
        rng.restore(rng_states)
    ck = cfg.checkpoint
    checkpointer = Checkpointer(
        save_dir,
        keep_last=ck.keep_last,
        checksums=ck.checksums,
        async_save=ck.async_save,
        config=cfg,
        run_config=os.path.join(cfg.run.output_dir, "config.yaml"),
        layout=layout,
    )
    return TrainParts(
        cfg=cfg,
        layout=layout,
        device=device,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        train_iters=train_iters,
        valid_dataset=valid_ds,
        checkpointer=checkpointer,
        step_stats=step_stats,
        data_clock=data_clock,
    )
