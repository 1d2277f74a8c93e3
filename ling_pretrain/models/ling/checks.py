"""Ling 2.0's own rules for a model config (beyond the GPT-wide ones)."""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.checks import check_moe, check_transformer

_MOE_FIELDS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


def check_ling(model_cfg: Any, errors: list[str]) -> None:
    """Append every reason ``model_cfg`` is not a Ling 2.0 model this trainer can build."""
    m = model_cfg
    check_transformer(m, errors)
    if not m.qk_layernorm:
        errors.append(
            "model.qk_layernorm=false: every Ling 2.0 model has QK-norm (its HF checkpoints hold "
            "query_layernorm / key_layernorm weights); leave model.qk_layernorm=true."
        )
    if m.rope_scaling:
        errors.append(
            "model.rope_scaling=true is Llama-3.1's RoPE scaling, which Ling 2.0 does not use; "
            "leave model.rope_scaling=false."
        )
    unset = [f"model.{k}" for k in _MOE_FIELDS if getattr(m, k) is None]
    if unset:
        errors.append(
            f"model.family=ling is a mixture-of-experts model: set {', '.join(unset)} "
            "(see conf/model/ling_mini.yaml)."
        )
        return
    if not 0 <= m.first_k_dense_replace <= m.num_layers:
        errors.append(
            f"model.first_k_dense_replace={m.first_k_dense_replace} must be in "
            f"[0, num_layers={m.num_layers}]."
        )
    check_moe(m, errors)
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
            errors.append(
                f"model.moe_router_num_groups={groups} leaves groups of "
                f"{m.num_moe_experts // groups} expert(s); the top-2 group score needs at least 2: "
                "lower model.moe_router_num_groups."
            )
