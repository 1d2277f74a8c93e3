"""Ling 2.0 (BailingMoeV2) on megatron-core's GPT model.

Ling 2.0 maps onto megatron-core's GPT model with RMSNorm, per-head QK-norm (one weight of
size head_dim shared by all heads, before RoPE), partial NeoX-style RoPE (``rotary_percent``),
untied embeddings, dense first layers via ``moe_layer_freq``, the sigmoid group-limited router
with expert bias (fp32), a shared expert, and MTP layers whose transformer layer is a copy of
the last decoder layer's spec (an MoE layer).
"""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.family import ModelFamily, ParamCounts
from ling_pretrain.models.gpt import decoder_kwargs, rope_gpt_model_kwargs
from ling_pretrain.models.ling.checks import check_ling
from ling_pretrain.models.ling.hf import LingHFAdapter
from ling_pretrain.models.ling.params import count_parameters


def moe_layer_pattern(model_cfg: Any) -> list[int]:
    """megatron's ``moe_layer_freq`` list: 0 for the first ``first_k_dense_replace`` layers."""
    k = model_cfg.first_k_dense_replace
    return [0] * k + [1] * (model_cfg.num_layers - k)


class LingFamily(ModelFamily):
    """Ling-mini-2.0, Ling-flash-2.0, Ling-1T and the tiny CPU model."""

    name = "ling"
    default_preset = "ling_mini"
    hf = LingHFAdapter()

    def transformer_kwargs(self, model_cfg: Any) -> dict[str, Any]:
        m = model_cfg
        return dict(
            **decoder_kwargs(m),
            # Mixture of experts.
            num_moe_experts=m.num_moe_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size or None,
            moe_layer_freq=moe_layer_pattern(m),
            moe_router_topk=m.moe_router_topk,
            moe_router_num_groups=m.moe_router_num_groups or None,
            moe_router_group_topk=m.moe_router_group_topk or None,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=m.moe_router_bias_update_rate,
            moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_z_loss_coeff=m.moe_z_loss_coeff or None,
            moe_router_dtype="fp32",
            # Multi-token prediction.
            mtp_num_layers=m.mtp_num_layers or None,
            mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        )

    def gpt_model_kwargs(self, model_cfg: Any) -> dict[str, Any]:
        return rope_gpt_model_kwargs(model_cfg)

    def moe_layer_pattern(self, model_cfg: Any) -> list[int]:
        return moe_layer_pattern(model_cfg)

    def count_parameters(self, model_cfg: Any) -> ParamCounts:
        return count_parameters(model_cfg)

    def check(self, cfg: Any, errors: list[str]) -> None:
        check_ling(cfg.model, errors)
