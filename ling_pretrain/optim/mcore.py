"""The optimizer and its learning-rate schedule, as megatron-core objects.

The one place that builds megatron-core's ``OptimizerConfig``, its optimizer and its
``OptimizerParamScheduler`` from our config (model-independent: every model family trains
with them). ``optimizer.optimizer=adam8bit`` is megatron's ``adam`` here: megatron builds its
distributed (or mixed-precision) optimizer around a torch Adam, and
:func:`build_optimizer` then swaps that inner Adam for
:class:`~ling_pretrain.optim.adam8bit.Adam8bit` before the first step, so the 8-bit moments
live beside megatron's fp32 main-parameter shards and everything else (gradient reduction,
clipping, parameter gather, checkpoint layout) stays megatron's.
"""

from __future__ import annotations

from typing import Any

import torch

from ling_pretrain.core.dtypes import torch_dtype
from ling_pretrain.optim.adam8bit import use_adam8bit


def _optimizer_dtype(name: str) -> torch.dtype:
    return torch.uint8 if name == "fp8" else torch_dtype(name)


def optimizer_config_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of megatron-core's ``OptimizerConfig`` for a job config."""
    o, t = cfg.optimizer, cfg.trainer
    dtype = torch_dtype(t.params_dtype)
    return dict(
        optimizer="adam" if o.optimizer == "adam8bit" else o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_precision_aware_optimizer=o.use_precision_aware_optimizer,
        main_grads_dtype=_optimizer_dtype(o.main_grads_dtype),
        main_params_dtype=_optimizer_dtype(o.main_params_dtype),
        exp_avg_dtype=_optimizer_dtype(o.exp_avg_dtype),
        exp_avg_sq_dtype=_optimizer_dtype(o.exp_avg_sq_dtype),
    )


def build_optimizer_config(cfg: Any):
    """megatron-core ``OptimizerConfig`` for a job config."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(**optimizer_config_kwargs(cfg))


def build_optimizer(cfg: Any, model: list) -> Any:
    """megatron's optimizer over ``model`` (DDP-wrapped chunks), with the inner Adam the
    config asks for."""
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(build_optimizer_config(cfg), model)
    if cfg.optimizer.optimizer == "adam8bit":
        use_adam8bit(optimizer)
    return optimizer


def scheduler_kwargs(cfg: Any) -> dict[str, Any]:
    """The schedule's arguments of megatron's ``OptimizerParamScheduler`` for a job config
    (what its checkpointed state records, and what a resumed run compares)."""
    o = cfg.optimizer
    decay = o.lr_decay_steps or cfg.trainer.max_steps
    return dict(
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(decay, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(decay // 10, 1) if o.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="cosine" if o.lr_decay_style == "WSD" else None,
    )


def build_scheduler(cfg: Any, optimizer: Any):
    """megatron's ``OptimizerParamScheduler``, counted in optimizer steps.

    On resume the config's values win (megatron's ``override_opt_param_scheduler``) unless
    ``checkpoint.use_checkpoint_scheduler`` asks for the checkpoint's. A resume whose schedule
    differs without either choice is refused before any work (``ling_pretrain.jobs.resume``),
    so megatron's own equality assertion is not needed here.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    use_checkpoint = bool(cfg.checkpoint.use_checkpoint_scheduler)
    return OptimizerParamScheduler(
        optimizer,
        **scheduler_kwargs(cfg),
        use_checkpoint_opt_param_scheduler=use_checkpoint,
        override_opt_param_scheduler=not use_checkpoint,
    )
