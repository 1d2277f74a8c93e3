"""``validate``: the one entry point that checks a job config before any process group exists.

Every problem found is collected and reported together in one :class:`ConfigError` (a
``ValueError``) whose lines name the fields involved and the fix, so a wrong layout fails in
seconds on the login node instead of minutes into a job. The checks live beside their
concern, and this module only calls them, in order:

=====================  ========================================================================
concern                where its checks live
=====================  ========================================================================
schema (unknown keys)  :mod:`ling_pretrain.config.checks` (also the run directory)
model family           ``ling_pretrain/models/<family>/`` (``ModelFamily.check``)
layout                 :mod:`ling_pretrain.core.layout`
trainer, checkpoint    :mod:`ling_pretrain.config.checks`; an HF directory by the family's adapter
logging                :mod:`ling_pretrain.config.checks`
resuming               :mod:`ling_pretrain.jobs.resume` (the checkpoint's model and schedule)
optimizer              :mod:`ling_pretrain.optim.checks`
data                   :mod:`ling_pretrain.data.checks`
FP8                    :mod:`ling_pretrain.fp8.checks`
hardware               :mod:`ling_pretrain.runtime.hardware` (and ``fp8.checks`` for recipes)
memory                 :mod:`ling_pretrain.memory.breakdown` (the one memory model)
=====================  ========================================================================
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from ling_pretrain.config.checks import (
    check_checkpoint,
    check_logging,
    check_run,
    check_trainer,
    check_unknown_keys,
)
from ling_pretrain.config.load import NO_MODEL
from ling_pretrain.core.errors import ConfigError, raise_if_any
from ling_pretrain.core.layout import Layout, check_layout, derive_layout
from ling_pretrain.data.checks import check_data
from ling_pretrain.fp8.checks import check_fp8, check_fp8_hardware
from ling_pretrain.jobs.resume import check_resume
from ling_pretrain.memory.breakdown import check_fits
from ling_pretrain.models.registry import get_family
from ling_pretrain.optim.checks import check_optimizer
from ling_pretrain.runtime.hardware import Hardware, check_hardware

__all__ = ["ConfigError", "Hardware", "Layout", "derive_layout", "validate"]


def validate(cfg: Any, world_size: int, hardware: Hardware | None = None) -> Layout:
    """Check a composed job config for a run on ``world_size`` processes.

    Args:
        cfg: the composed config (``JobConfig`` structure).
        world_size: number of training processes.
        hardware: the machine; detected when None.

    Returns:
        The derived parallel layout.

    Raises:
        ConfigError: listing every problem found, each with the field names and the fix.
    """
    if OmegaConf.is_missing(cfg, "model"):
        raise ConfigError(NO_MODEL)
    errors: list[str] = []
    check_unknown_keys(cfg, errors)
    raise_if_any(errors)
    try:
        family = get_family(cfg.model)
    except ConfigError as err:
        raise_if_any([str(err)])
    family.check(cfg, errors)
    check_layout(cfg, world_size, errors)
    check_trainer(cfg, errors)
    check_logging(cfg, errors)
    check_run(cfg, errors)
    check_optimizer(cfg, errors)
    check_data(cfg, errors)
    check_checkpoint(cfg, errors)
    ck = cfg.checkpoint
    if ck.init_from_hf:
        errors += family.hf.dir_problems(
            ck.init_from_hf, cfg.model, init_missing_mtp=bool(ck.hf_init_missing_mtp)
        )
    check_fp8(cfg, errors)
    if not errors:
        check_resume(cfg, errors)
    if not errors:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        hw = hardware or Hardware.detect(local)
        check_hardware(cfg, hw, errors)
        check_fp8_hardware(cfg, hw, errors)
        if cfg.run.check_memory and not errors:
            device = "cuda" if hw.on_gpu(cfg) else "cpu"
            check_fits(cfg, world_size, device, hw.memory_bytes, errors)
    raise_if_any(errors)
    return derive_layout(cfg, world_size)
