"""Closed-form parameter counts of a Ling 2.0 configuration.

Used for the memory-fit check before any process starts work, and by ``launch/model_info.py``.
Counts follow the HF checkpoint: embeddings and lm_head are untied, there are no biases, the
expert bias is a buffer (counted under ``buffers``, not in the totals), and the MTP layer is
reported separately because the published totals exclude it.
"""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.family import ParamCounts


def _attention(m: Any) -> int:
    q = m.num_attention_heads * m.kv_channels
    kv = 2 * m.num_query_groups * m.kv_channels
    qkv = m.hidden_size * (q + kv)
    out = q * m.hidden_size
    qk_norm = 2 * m.kv_channels
    return qkv + out + qk_norm + m.hidden_size  # + input_layernorm


def _swiglu(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn


def _moe_layer(m: Any) -> tuple[int, int, int]:
    """(total, active, routed-expert) parameters of the MoE MLP of one layer, with its norm."""
    router = m.num_moe_experts * m.hidden_size
    expert = _swiglu(m.hidden_size, m.moe_ffn_hidden_size)
    shared = (
        _swiglu(m.hidden_size, m.moe_shared_expert_intermediate_size)
        if m.moe_shared_expert_intermediate_size
        else 0
    )
    norm = m.hidden_size
    total = router + m.num_moe_experts * expert + shared + norm
    active = router + m.moe_router_topk * expert + shared + norm
    return total, active, m.num_moe_experts * expert


def count_parameters(model_cfg: Any) -> ParamCounts:
    """Count parameters of a model config (a ``ModelConfig`` or anything with its fields)."""
    m = model_cfg
    attn = _attention(m)
    dense = _swiglu(m.hidden_size, m.ffn_hidden_size) + m.hidden_size
    moe_total, moe_active, moe_experts = _moe_layer(m)
    n_dense = min(m.first_k_dense_replace, m.num_layers)
    n_moe = m.num_layers - n_dense
    embedding = 2 * m.vocab_size * m.hidden_size
    final_norm = m.hidden_size

    total = embedding + final_norm + m.num_layers * attn + n_dense * dense + n_moe * moe_total
    active = embedding + final_norm + m.num_layers * attn + n_dense * dense + n_moe * moe_active

    mtp_extra = 2 * m.hidden_size + 2 * m.hidden_size * m.hidden_size + m.hidden_size
    mtp_total = m.mtp_num_layers * (mtp_extra + attn + moe_total)
    mtp_active = m.mtp_num_layers * (mtp_extra + attn + moe_active)
    bias = m.num_moe_experts if m.moe_router_enable_expert_bias else 0
    return ParamCounts(
        total_params=total,
        active_params=active,
        mtp_params=mtp_total,
        mtp_active_params=mtp_active,
        embedding_params=embedding,
        expert_params=n_moe * moe_experts,
        mtp_expert_params=m.mtp_num_layers * moe_experts,
        buffers=bias * (n_moe + m.mtp_num_layers),
    )
