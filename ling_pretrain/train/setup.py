"""Assemble the parts of a training run into a plain dataclass (no god object)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ling_pretrain.checkpoint.dist import TrainState, find_latest, load_checkpoint
from ling_pretrain.checkpoint.hf.loader import load_hf_into_model
from ling_pretrain.core.layout import Layout
from ling_pretrain.data.gpt import build_datasets, data_cache_dir, make_loader, resolve_data
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
    step_stats: dict = field(default_factory=dict)
    """Per-step statistics filled during the step (expert load)."""
    data_clock: WaitClock = field(default_factory=WaitClock)
    """Time spent waiting for training batches (the iterators in ``train_iters``)."""


def _restore(cfg: Any, model: list, optimizer: Any, scheduler: Any, save_dir: str) -> TrainState:
    """Resume (everything) or initialise (weights only), as the checkpoint config says."""
    ck = cfg.checkpoint
    if ck.load_dir:
        logger.info("resuming from %s", ck.load_dir)
        return load_checkpoint(ck.load_dir, model, optimizer, scheduler)
    latest = find_latest(save_dir) if ck.resume else None
    if latest is not None:
        logger.info("resuming from %s", latest)
        state = load_checkpoint(latest, model, optimizer, scheduler)
        if state.weights_only:
            optimizer.reload_model_params()
        return state
    if ck.init_from:
        logger.info("initialising weights from %s (fresh optimizer, step 0)", ck.init_from)
        load_checkpoint(ck.init_from, model)
        # The optimizer's fp32 master weights were copied before the load; refresh them.
        optimizer.reload_model_params()
    elif ck.init_from_hf:
        logger.info("initialising weights from HF %s (fresh optimizer, step 0)", ck.init_from_hf)
        load_hf_into_model(ck.init_from_hf, model, cfg, get_family(cfg.model).hf)
        optimizer.reload_model_params()
    return TrainState()


def setup(cfg: Any, layout: Layout, device: torch.device, save_dir: str) -> TrainParts:
    """Build model, optimizer, schedule and data for this rank, restoring a checkpoint."""
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

    state = _restore(cfg, model, optimizer, scheduler, save_dir)

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
        step_stats=step_stats,
        data_clock=data_clock,
    )
