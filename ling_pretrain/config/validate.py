"""Cross-field checks of a job config, run once before any process group exists.

Every check raises :class:`ConfigError` (a ``ValueError``) whose message names the fields
involved and the fix, so a wrong layout fails in seconds on the login node instead of minutes
into a job. All problems found are reported together.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

from ling_pretrain.core.dtypes import PARAMS_DTYPES
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.layout import Layout, check_layout, derive_layout
from ling_pretrain.core.recipes import RECIPES

DATA_SOURCES = ("indexed", "mock", "builtin")
OPTIMIZERS = ("adam", "adam8bit")
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
RECOMPUTE = (None, "full", "selective")
GIB = 1024**3
TE_ON_DEMAND_TRANSPOSE = (2, 4)
"""Oldest TransformerEngine release read whose blockwise weights rebuild their column-wise
copy from the row-wise one in the backward (``update_usage`` -> ``_create_columnwise``)."""

__all__ = ["ConfigError", "Hardware", "Layout", "derive_layout", "validate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """What the current machine offers one training process."""

    device: str
    """``cuda`` or ``cpu``."""
    memory_bytes: int
    """Memory available to one process: one GPU's memory, or host RAM divided by the
    processes on this node."""
    has_transformer_engine: bool
    """Whether ``transformer_engine`` can be imported."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability of device 0, when CUDA is present."""
    te_version: str | None = None
    """Installed TransformerEngine version (from package metadata), when known."""

    @staticmethod
    def detect(local_world_size: int = 1) -> Hardware:
        """Inspect this machine without initialising CUDA contexts on other devices."""
        import torch

        has_te = importlib.util.find_spec("transformer_engine") is not None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Hardware(
                "cuda", props.total_memory, has_te, (props.major, props.minor), _te_version()
            )
        import psutil

        ram = psutil.virtual_memory().total // max(local_world_size, 1)
        return Hardware("cpu", ram, has_te)


def _te_version() -> str | None:
    from importlib import metadata

    for dist in ("transformer_engine", "transformer-engine"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _check_unknown_keys(cfg: Any, errors: list[str]) -> None:
    """Hydra's ``+group.key=value`` adds keys even to typed nodes; refuse ones no schema has."""
    import dataclasses
    import difflib
    import typing

    from ling_pretrain.config.schema import JobConfig

    def walk(node: Any, schema: type, path: str) -> None:
        hints = typing.get_type_hints(schema)
        for key in node.keys():
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1)
                hint = f" (did you mean {path}{close[0]}?)" if close else ""
                errors.append(f"{path}{key} is not a configuration field{hint}.")
            elif dataclasses.is_dataclass(hints[key]):
                walk(node[key], hints[key], f"{path}{key}.")

    walk(cfg, JobConfig, "")


def _check_model(cfg: Any, errors: list[str]) -> None:
    m = cfg.model
    if m.num_attention_heads % m.num_query_groups:
        errors.append(
            f"model.num_query_groups={m.num_query_groups} must divide "
            f"model.num_attention_heads={m.num_attention_heads}."
        )
    if not 0 < m.rotary_percent <= 1:
        errors.append(f"model.rotary_percent={m.rotary_percent} must be in (0, 1].")
    if not 0 <= m.first_k_dense_replace <= m.num_layers:
        errors.append(
            f"model.first_k_dense_replace={m.first_k_dense_replace} must be in "
            f"[0, num_layers={m.num_layers}]."
        )
    if m.moe_router_topk > m.num_moe_experts:
        errors.append(
            f"model.moe_router_topk={m.moe_router_topk} exceeds num_moe_experts={m.num_moe_experts}."
        )
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if groups:
        if m.num_moe_experts % groups:
            errors.append(
                f"model.moe_router_num_groups={groups} must divide num_moe_experts="
                f"{m.num_moe_experts}."
            )
        if not 1 <= group_topk <= groups:
            errors.append(f"model.moe_router_group_topk={group_topk} must be in [1, {groups}].")
        elif m.moe_router_topk != 2 * group_topk:
            errors.append(
                f"model.moe_router_topk={m.moe_router_topk} != 2 x moe_router_group_topk="
                f"{group_topk}: megatron-core scores a group by its top (topk / group_topk) "
                "experts while Ling's HF checkpoints always use the top 2, so this model would "
                "train differently from the one it is served as. Use topk = 2 x group_topk."
            )
        elif (m.num_moe_experts // groups) < 2:
            errors.append("each expert group needs at least 2 experts (top-2 group score).")
    if m.moe_router_score_function not in ("sigmoid", "softmax"):
        errors.append(
            f"model.moe_router_score_function={m.moe_router_score_function!r} must be "
            "'sigmoid' or 'softmax'."
        )
    if m.mtp_num_layers < 0:
        errors.append("model.mtp_num_layers must be >= 0.")
    elif m.mtp_num_layers > 1:
        errors.append(
            f"model.mtp_num_layers={m.mtp_num_layers}: the trainer makes MTP a per-token mean "
            "over the global batch (Ling's loss) for one MTP layer, as Ling trains; use 1 or 0."
        )
    if m.moe_router_bias_update not in ("megatron", "zero_mean"):
        errors.append(
            f"model.moe_router_bias_update={m.moe_router_bias_update!r} must be 'megatron' "
            "or 'zero_mean'."
        )


def _check_training(cfg: Any, errors: list[str]) -> None:
    t, o, d = cfg.trainer, cfg.optimizer, cfg.data
    if t.params_dtype not in PARAMS_DTYPES:
        errors.append(f"trainer.params_dtype={t.params_dtype!r} must be one of fp32, bf16, fp16.")
    if t.max_steps < 1:
        errors.append(f"trainer.max_steps={t.max_steps} must be >= 1.")
    if t.recompute_granularity not in RECOMPUTE:
        errors.append(
            f"trainer.recompute_granularity={t.recompute_granularity!r} must be null, 'full' or "
            "'selective'."
        )
    if o.optimizer not in OPTIMIZERS:
        errors.append(
            f"optimizer.optimizer={o.optimizer!r} must be 'adam' (AdamW) or 'adam8bit' (AdamW "
            "with 8-bit moments)."
        )
    _check_precision_aware(cfg, errors)
    if o.lr_decay_style not in DECAY_STYLES:
        errors.append(
            f"optimizer.lr_decay_style={o.lr_decay_style!r} must be one of {', '.join(DECAY_STYLES)}."
        )
    if o.min_lr > o.lr:
        errors.append(f"optimizer.min_lr={o.min_lr} exceeds optimizer.lr={o.lr}.")
    if d.source not in DATA_SOURCES:
        errors.append(f"data.source={d.source!r} must be one of {', '.join(DATA_SOURCES)}.")
    if d.source == "indexed":
        if not d.prefixes:
            errors.append(
                "data.source=indexed needs data.prefixes=[...] (outputs of "
                "data_tools/pretokenize.py), or use data=builtin / data=mock."
            )
        from ling_pretrain.data.gpt import expand_prefix

        for prefix in d.prefixes:
            try:
                expand_prefix(prefix)
            except ValueError as err:
                errors.append(str(err))
        if d.weights is not None and len(d.weights) != len(d.prefixes):
            errors.append(
                f"data.weights has {len(d.weights)} entries but data.prefixes has "
                f"{len(d.prefixes)}; give one weight per prefix or null."
            )
        if d.eod_token_id is None and d.tokenizer is None:
            errors.append(
                "data.source=indexed needs data.eod_token_id or data.tokenizer (an HF tokenizer "
                "directory) to know the end-of-document token."
            )
    if d.seq_length < 2:
        errors.append(f"data.seq_length={d.seq_length} must be >= 2.")
    if cfg.checkpoint.init_from and cfg.checkpoint.load_dir:
        errors.append(
            "checkpoint.init_from (weights only, step 0) and checkpoint.load_dir (full resume) "
            "exclude each other; set one."
        )
    if cfg.checkpoint.init_from_hf:
        from ling_pretrain.checkpoint.hf import hf_dir_problems

        if cfg.checkpoint.init_from or cfg.checkpoint.load_dir:
            errors.append(
                "checkpoint.init_from_hf excludes checkpoint.init_from and checkpoint.load_dir; "
                "set one."
            )
        errors.extend(
            hf_dir_problems(
                cfg.checkpoint.init_from_hf,
                cfg.model,
                init_missing_mtp=bool(cfg.checkpoint.hf_init_missing_mtp),
            )
        )


def _check_precision_aware(cfg: Any, errors: list[str]) -> None:
    o = cfg.optimizer
    fields = {
        # megatron-core's DDP (not megatron-FSDP) never reads main_grads_dtype: gradients stay
        # in DDP's buffer, which this trainer keeps in fp32 (grad_reduce_in_fp32).
        "main_grads_dtype": ("fp32",),
        "main_params_dtype": ("fp32", "fp16"),
        "exp_avg_dtype": ("fp32", "fp16", "bf16", "fp8"),
        "exp_avg_sq_dtype": ("fp32", "fp16", "bf16", "fp8"),
    }
    for name, allowed in fields.items():
        value = getattr(o, name)
        if value not in allowed:
            errors.append(f"optimizer.{name}={value!r} must be one of {', '.join(allowed)}.")
        elif value != "fp32" and not o.use_precision_aware_optimizer:
            errors.append(
                f"optimizer.{name}={value} takes effect only with the precision-aware optimizer; "
                "set optimizer.use_precision_aware_optimizer=true (CUDA + TransformerEngine) or "
                f"leave {name}=fp32."
            )
    if not o.use_precision_aware_optimizer:
        return
    if o.optimizer != "adam":
        errors.append(
            f"optimizer.use_precision_aware_optimizer=true needs optimizer.optimizer=adam (TE's "
            f"FusedAdam), not {o.optimizer!r}; adam8bit already stores its moments in 8 bits."
        )
    if not cfg.parallel.use_distributed_optimizer:
        errors.append(
            "optimizer.use_precision_aware_optimizer=true needs "
            "parallel.use_distributed_optimizer=true."
        )


def _check_hardware(cfg: Any, world_size: int, hw: Hardware, errors: list[str]) -> None:
    p, f = cfg.parallel, cfg.fp8
    requested = cfg.run.device
    if requested not in ("auto", "cuda", "cpu"):
        errors.append(f"run.device={requested!r} must be 'auto', 'cuda' or 'cpu'.")
    if requested == "cuda" and hw.device != "cuda":
        errors.append("run.device=cuda but no CUDA device is visible; use run.device=auto.")
    on_gpu = hw.device == "cuda" and requested != "cpu"

    if p.context_parallel_size > 1 and not (on_gpu and hw.has_transformer_engine):
        errors.append(
            f"parallel.context_parallel_size={p.context_parallel_size} needs TransformerEngine "
            "on CUDA GPUs (only TE's attention supports context parallelism); set it to 1 here."
        )
    if p.moe_token_dispatcher_type == "flex" and not (on_gpu and hw.has_transformer_engine):
        errors.append(
            "parallel.moe_token_dispatcher_type=flex needs CUDA GPUs with DeepEP and "
            "TransformerEngine; use alltoall."
        )
    if cfg.optimizer.use_precision_aware_optimizer and not (on_gpu and hw.has_transformer_engine):
        errors.append(
            "optimizer.use_precision_aware_optimizer=true needs TransformerEngine's FusedAdam on "
            "CUDA GPUs; this machine has "
            + ("no CUDA device" if not on_gpu else "no importable transformer_engine")
            + ". Use optimizer=adam8bit for 8-bit moments without TE, or turn it off."
        )
    if f.recipe not in RECIPES:
        errors.append(f"fp8.recipe={f.recipe!r} is not one of {', '.join(RECIPES)}.")

    elif f.recipe != "bf16" and not f.emulate:
        if not on_gpu:
            errors.append(
                f"fp8.recipe={f.recipe} needs an NVIDIA GPU with TransformerEngine; this machine "
                "has no CUDA device. Use fp8=bf16, or fp8.emulate=true to emulate the recipe's "
                "numerics."
            )
        elif not hw.has_transformer_engine:
            errors.append(
                f"fp8.recipe={f.recipe} needs TransformerEngine (pip install "
                "'ling_pretrain[gpu]'); it is not importable."
            )
        elif f.recipe.startswith("blockwise") and (hw.compute_capability or (0, 0)) < (9, 0):
            errors.append(
                f"fp8.recipe={f.recipe} needs compute capability >= 9.0 (Hopper); this GPU is "
                f"{hw.compute_capability}."
            )
        elif f.recipe == "mxfp8" and (hw.compute_capability or (0, 0)) < (10, 0):
            errors.append("fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0).")
        else:
            _check_te_fp8_options(cfg, hw, errors)

    if cfg.run.check_memory and not errors:
        need = estimate_state_bytes(cfg, world_size)
        if need > hw.memory_bytes:
            where = "one GPU" if on_gpu else "the host RAM share of one process"
            errors.append(
                f"model {cfg.model.name} needs at least {need / GIB:.1f} GiB per process for "
                f"weights, gradients and optimizer states under this layout, but {where} has "
                f"{hw.memory_bytes / GIB:.1f} GiB. Spread it over more GPUs (raise "
                "expert_model_parallel_size / pipeline_model_parallel_size / data parallelism "
                "with the distributed optimizer) or pick a smaller model (+model=ling_tiny on CPU)."
                " run.check_memory=false skips this check."
            )


def _check_te_fp8_options(cfg: Any, hw: Hardware, errors: list[str]) -> None:
    """FP8 options on the real TransformerEngine path (not under emulation)."""
    f = cfg.fp8
    if f.on_demand_transpose:
        fp8_weights = f.recipe == "blockwise_fp8_params" or f.fp8_param_gather
        if not f.recipe.startswith("blockwise"):
            errors.append(
                f"fp8.on_demand_transpose=true needs weights scaled in 128x128 blocks "
                f"(fp8.recipe=blockwise or blockwise_fp8_params); with fp8.recipe={f.recipe} "
                "TransformerEngine cannot rebuild the transposed weight from the row-wise one. "
                "Set fp8.on_demand_transpose=false."
            )
        elif not fp8_weights:
            errors.append(
                "fp8.on_demand_transpose=true needs FP8 primary weights on TransformerEngine "
                "(fp8.fp8_param_gather=true, or fp8=blockwise_fp8_params): with BF16 weights TE "
                "caches a quantised copy per module that this option does not manage. Turn on "
                "fp8.fp8_param_gather or set fp8.on_demand_transpose=false."
            )
        elif hw.te_version and _version_tuple(hw.te_version) < TE_ON_DEMAND_TRANSPOSE:
            need = ".".join(map(str, TE_ON_DEMAND_TRANSPOSE))
            errors.append(
                f"fp8.on_demand_transpose=true needs TransformerEngine >= {need} (its blockwise "
                "tensors rebuild the column-wise copy inside the backward GEMM); this machine has "
                f"{hw.te_version}. Upgrade TransformerEngine or set fp8.on_demand_transpose=false."
            )
    if f.moe_router_padding_for_quantization and f.recipe == "tensorwise":
        logger.warning(
            "fp8.moe_router_padding_for_quantization=true with fp8.recipe=tensorwise changes the "
            "numbers: the padded tokens are real hidden states (routed with probability 0) and "
            "enter each expert's per-tensor FP8 scale. megatron-core accepts it, and padding "
            "is only number-neutral with the block-scaled recipes (blockwise, mxfp8). Set "
            "fp8.moe_router_padding_for_quantization=false to keep tensorwise numbers "
            "independent of the padding."
        )


def _check_fp8(cfg: Any, errors: list[str]) -> None:
    """FP8 settings that contradict each other."""
    f, n = cfg.fp8, cfg.model.num_layers
    if f.emulate and f.recipe == "bf16":
        errors.append(
            "fp8.emulate=true with fp8.recipe=bf16 has no FP8 GEMMs to emulate; choose a recipe "
            "(e.g. fp8=blockwise fp8.emulate=true) or drop fp8.emulate."
        )
    start, end = f.num_layers_at_start_in_bf16, f.num_layers_at_end_in_bf16
    if start < 0 or end < 0:
        errors.append(
            f"fp8.num_layers_at_start_in_bf16={start} and fp8.num_layers_at_end_in_bf16={end} "
            "must be >= 0."
        )
    elif f.first_last_layers_bf16 and start + end > n:
        errors.append(
            f"fp8.num_layers_at_start_in_bf16 + num_layers_at_end_in_bf16 = {start + end} "
            f"exceeds model.num_layers={n}."
        )


def estimate_state_bytes(cfg: Any, world_size: int) -> int:
    """Lower bound of the bytes one rank holds for weights, gradients and optimizer states.

    Activations are not counted, so a layout that fails this bound certainly cannot run.
    Gradients are fp32 (megatron's main_grad); Adam keeps fp32 master weights (when params are
    not fp32) and two fp32 moments, sharded over data parallelism by the distributed optimizer.
    """
    from ling_pretrain.models.ling.params import count_parameters

    layout = derive_layout(cfg, world_size)
    counts = count_parameters(cfg.model)
    experts = counts.expert_params + counts.mtp_expert_params
    dense = counts.total_params + counts.mtp_params - experts
    local_dense = dense / (layout.tp * layout.pp)
    local_experts = experts / (layout.ep * layout.etp * layout.pp)
    param_bytes = PARAMS_DTYPES.get(cfg.trainer.params_dtype, 4)
    per_param = param_bytes + 4  # weight + fp32 grad
    moments = 2 + 2 * 4 / 256 if cfg.optimizer.optimizer == "adam8bit" else 8
    opt = moments + (0 if param_bytes == 4 else 4)
    dense_opt_shard = layout.dp * layout.cp if cfg.parallel.use_distributed_optimizer else 1
    expert_opt_shard = layout.expert_dp if cfg.parallel.use_distributed_optimizer else 1
    total = local_dense * (per_param + opt / dense_opt_shard) + local_experts * (
        per_param + opt / expert_opt_shard
    )
    return int(total)


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
    errors: list[str] = []
    _check_unknown_keys(cfg, errors)
    if errors:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))
    _check_model(cfg, errors)
    check_layout(cfg, world_size, errors)
    _check_training(cfg, errors)
    _check_fp8(cfg, errors)
    if not errors:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        _check_hardware(cfg, world_size, hardware or Hardware.detect(local), errors)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"invalid configuration ({len(errors)} problem(s)):\n{lines}")
    return derive_layout(cfg, world_size)
