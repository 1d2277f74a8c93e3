"""Checks of the ``optimizer`` group."""

from __future__ import annotations

from typing import Any

OPTIMIZERS = ("adam", "adam8bit")
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
_PRECISION_AWARE_DTYPES = {
    # megatron-core's DDP (not megatron-FSDP) never reads main_grads_dtype: gradients stay in
    # DDP's buffer, which this trainer keeps in fp32 (grad_reduce_in_fp32).
    "main_grads_dtype": ("fp32",),
    "main_params_dtype": ("fp32", "fp16"),
    "exp_avg_dtype": ("fp32", "fp16", "bf16", "fp8"),
    "exp_avg_sq_dtype": ("fp32", "fp16", "bf16", "fp8"),
}


def check_optimizer(cfg: Any, errors: list[str]) -> None:
    """Append every problem of ``cfg.optimizer`` (hardware needs: see ``runtime.hardware``)."""
    o = cfg.optimizer
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
        errors.append(
            f"optimizer.min_lr={o.min_lr} exceeds optimizer.lr={o.lr}; set optimizer.min_lr<="
            f"{o.lr}."
        )


def _check_precision_aware(cfg: Any, errors: list[str]) -> None:
    o = cfg.optimizer
    for name, allowed in _PRECISION_AWARE_DTYPES.items():
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
