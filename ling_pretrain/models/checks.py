"""Rules every GPT-style model config obeys, whatever its family."""

from __future__ import annotations

from typing import Any

BIAS_UPDATES = ("megatron", "zero_mean")
"""``model.moe_router_bias_update`` values (applied in :mod:`ling_pretrain.train.moe`)."""


def check_transformer(model_cfg: Any, errors: list[str]) -> None:
    """Append the problems of the fields every family shares (attention, RoPE, MTP)."""
    m = model_cfg
    positive = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups")
    bad = [f"model.{k}={getattr(m, k)}" for k in positive if getattr(m, k) < 1]
    if bad:
        errors.append(f"{', '.join(bad)}: these must be >= 1.")
        return
    if m.num_attention_heads % m.num_query_groups:
        errors.append(
            f"model.num_query_groups={m.num_query_groups} must divide "
            f"model.num_attention_heads={m.num_attention_heads}."
        )
    if not 0 < m.rotary_percent <= 1:
        errors.append(f"model.rotary_percent={m.rotary_percent} must be in (0, 1].")
    if m.mtp_num_layers < 0:
        errors.append("model.mtp_num_layers must be >= 0.")
    elif m.mtp_num_layers > 1:
        errors.append(
            f"model.mtp_num_layers={m.mtp_num_layers}: the trainer makes MTP a per-token mean "
            "over the global batch (Ling's loss) for one MTP layer, as Ling trains; use 1 or 0."
        )


def check_moe(model_cfg: Any, errors: list[str]) -> None:
    """Append the problems of a mixture-of-experts model's router settings."""
    m = model_cfg
    if m.moe_router_topk > m.num_moe_experts:
        errors.append(
            f"model.moe_router_topk={m.moe_router_topk} exceeds num_moe_experts={m.num_moe_experts}."
        )
    if m.moe_router_score_function not in ("sigmoid", "softmax"):
        errors.append(
            f"model.moe_router_score_function={m.moe_router_score_function!r} must be "
            "'sigmoid' or 'softmax'."
        )
    if m.moe_router_bias_update not in BIAS_UPDATES:
        errors.append(
            f"model.moe_router_bias_update={m.moe_router_bias_update!r} must be "
            f"{' or '.join(repr(b) for b in BIAS_UPDATES)}."
        )
