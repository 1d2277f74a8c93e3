"""Optimizer choice and the precision-aware optimizer: mapping to megatron-core, validation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB, memory_breakdown
from ling_pretrain.optim.mcore import build_optimizer_config, optimizer_config_kwargs

CPU = Hardware("cpu", 24 * GIB, has_transformer_engine=False)
H100 = Hardware("cuda", 80 * GIB, has_transformer_engine=True, compute_capability=(9, 0))
H100_NO_TE = Hardware("cuda", 80 * GIB, has_transformer_engine=False, compute_capability=(9, 0))

PRECISION_AWARE = [
    "optimizer.use_precision_aware_optimizer=true",
    "optimizer.main_params_dtype=fp16",
    "optimizer.exp_avg_dtype=fp8",
    "optimizer.exp_avg_sq_dtype=bf16",
]


def _tiny(*overrides: str):
    return compose(["+model=ling_tiny", "data=mock", *overrides])


def test_adam8bit_preset_composes_validates_and_maps_to_megatron_adam():
    cfg = _tiny("optimizer=adam8bit")
    assert cfg.optimizer.optimizer == "adam8bit"
    validate(cfg, 1, CPU)
    opt = build_optimizer_config(cfg)
    assert opt.optimizer == "adam" and not opt.use_precision_aware_optimizer
    assert (opt.lr, opt.weight_decay, opt.adam_beta2) == (1e-3, 0.1, 0.95)


def test_precision_aware_fields_map_field_by_field():
    kw = optimizer_config_kwargs(_tiny(*PRECISION_AWARE))
    assert kw["use_precision_aware_optimizer"] is True
    assert kw["main_grads_dtype"] == torch.float32
    assert kw["main_params_dtype"] == torch.float16
    assert kw["exp_avg_dtype"] == torch.uint8  # megatron-core / TE spell FP8 moments uint8
    assert kw["exp_avg_sq_dtype"] == torch.bfloat16
    off = optimizer_config_kwargs(_tiny())
    assert off["use_precision_aware_optimizer"] is False
    for name in ("main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
        assert off[name] == torch.float32
    # The defaults are megatron-core's own.
    assert build_optimizer_config(_tiny()).exp_avg_dtype == torch.float32


def test_precision_aware_validates_on_a_te_gpu():
    validate(_tiny(*PRECISION_AWARE), 1, H100)


@pytest.mark.parametrize(
    "overrides,hardware,pattern",
    [
        (["optimizer.optimizer=adam9bit"], CPU, r"optimizer.optimizer='adam9bit' must be 'adam'"),
        (PRECISION_AWARE, CPU, r"use_precision_aware_optimizer=true needs TransformerEngine"),
        (PRECISION_AWARE, H100_NO_TE, r"no importable transformer_engine"),
        (
            [*PRECISION_AWARE, "optimizer=adam8bit"],
            H100,
            r"needs optimizer.optimizer=adam .*not 'adam8bit'",
        ),
        (
            [*PRECISION_AWARE, "parallel.use_distributed_optimizer=false"],
            H100,
            r"needs parallel.use_distributed_optimizer=true",
        ),
        (["optimizer.exp_avg_dtype=bf16"], H100, r"exp_avg_dtype=bf16 takes effect only with"),
        (
            ["optimizer.use_precision_aware_optimizer=true", "optimizer.main_params_dtype=bf16"],
            H100,
            r"main_params_dtype='bf16' must be one of fp32, fp16",
        ),
        (
            ["optimizer.use_precision_aware_optimizer=true", "optimizer.main_grads_dtype=bf16"],
            H100,
            r"main_grads_dtype='bf16' must be one of fp32\.",
        ),
    ],
)
def test_refused_with_the_cause_and_the_fix(overrides, hardware, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(_tiny(*overrides), 1, hardware)


def test_memory_estimate_counts_two_bytes_per_moment_pair():
    mini = ["+model=ling_mini", "data=mock", "trainer.params_dtype=bf16"]
    adam = memory_breakdown(compose(mini), 1).total
    eight = memory_breakdown(compose([*mini, "optimizer=adam8bit"]), 1).total
    # On one process (no sharding of the moments) the saving is 8 - 2.03125 bytes per
    # parameter, except in tensors under 4096 elements (norms: 6e-6 of the parameters), which
    # keep fp32 moments.
    from ling_pretrain.models.ling.params import count_parameters

    counts = count_parameters(compose(mini).model)
    total = counts.total_params + counts.mtp_params
    assert adam - eight == pytest.approx(total * (8 - 2.03125), rel=1e-5)
    assert adam - eight < total * (8 - 2.03125)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
    reason="the precision-aware optimizer needs CUDA and TransformerEngine",
)
def test_megatron_accepts_the_precision_aware_config():
    opt = build_optimizer_config(_tiny(*PRECISION_AWARE))
    assert opt.use_precision_aware_optimizer and opt.exp_avg_dtype == torch.uint8
