"""What the dense GPT families (``llama``, ``qwen3``) share on megatron-core's GPT model.

Llama 3.x and dense Qwen3 are the same pre-norm decoder: RMSNorm, grouped-query attention
without biases, full (not partial) NeoX-style RoPE, a SwiGLU MLP and untied embeddings. They
differ in two switches, which each family fixes: QK-norm (Qwen3 has it) and Llama-3.1's
RoPE frequency scaling (megatron-core's ``GPTModel`` ``rope_scaling``). A family folder
subclasses :class:`DenseGPTFamily`, setting those two and its HF adapter
(:class:`~ling_pretrain.models.dense_hf.DenseHFAdapter`).

Mixture-of-experts and MTP fields must be null / 0: these models have neither, and their HF
checkpoints hold no tensors for them.
"""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.checks import check_transformer
from ling_pretrain.models.family import ModelFamily, ParamCounts
from ling_pretrain.models.gpt import decoder_kwargs, rope_gpt_model_kwargs

MOE_FIELDS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
"""``ModelConfig`` fields that make a model a mixture of experts (null for dense models)."""


def count_dense_parameters(model_cfg: Any) -> ParamCounts:
    """Closed-form parameter counts of a dense GPT model (untied embeddings, no biases).

    Per layer: the QKV and output projections, QK-norm weights (``kv_channels`` each for q
    and k) where the model has them, the two RMSNorm weights and the SwiGLU MLP
    (``gate``, ``up``, ``down``); plus the embedding, the final norm and the lm_head.
    """
    m = model_cfg
    q = m.num_attention_heads * m.kv_channels
    kv = 2 * m.num_query_groups * m.kv_channels
    attention = m.hidden_size * (q + kv) + q * m.hidden_size
    qk_norm = 2 * m.kv_channels if m.qk_layernorm else 0
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    norms = 2 * m.hidden_size
    layer = attention + qk_norm + mlp + norms
    embedding = 2 * m.vocab_size * m.hidden_size
    total = embedding + m.hidden_size + m.num_layers * layer
    return ParamCounts(
        total_params=total,
        active_params=total,
        mtp_params=0,
        mtp_active_params=0,
        embedding_params=embedding,
        expert_params=0,
        mtp_expert_params=0,
        buffers=0,
    )


class DenseGPTFamily(ModelFamily):
    """A dense decoder-only family; subclasses set the class attributes below."""

    qk_layernorm: bool
    """Whether the family's models have QK-norm (``model.qk_layernorm`` must equal it)."""
    uses_rope_scaling: bool
    """Whether the family's models may use Llama-3.1's RoPE scaling (``model.rope_scaling``)."""
    example_preset: str
    """A preset named in error messages."""

    def transformer_kwargs(self, model_cfg: Any) -> dict[str, Any]:
        return decoder_kwargs(model_cfg)

    def gpt_model_kwargs(self, model_cfg: Any) -> dict[str, Any]:
        return rope_gpt_model_kwargs(model_cfg)

    def count_parameters(self, model_cfg: Any) -> ParamCounts:
        return count_dense_parameters(model_cfg)

    def check(self, cfg: Any, errors: list[str]) -> None:
        check_dense(cfg.model, errors, self)


def check_dense(model_cfg: Any, errors: list[str], family: DenseGPTFamily) -> None:
    """Append every reason ``model_cfg`` is not a valid model of the dense ``family``."""
    m = model_cfg
    name = family.name
    check_transformer(m, errors)
    moe = [f"model.{k}" for k in MOE_FIELDS if getattr(m, k) is not None]
    if moe:
        errors.append(
            f"model.family={name} is a dense model: {', '.join(moe)} must be null (it has no "
            f"experts; see conf/model/{family.example_preset}.yaml)."
        )
    if m.mtp_num_layers:
        errors.append(
            f"model.mtp_num_layers={m.mtp_num_layers}: model.family={name} has no MTP layers "
            "(its HF checkpoints hold none); set model.mtp_num_layers=0."
        )
    if bool(m.qk_layernorm) != family.qk_layernorm:
        has = "has" if family.qk_layernorm else "has no"
        errors.append(
            f"model.qk_layernorm={str(bool(m.qk_layernorm)).lower()}: model.family={name} {has} "
            f"QK-norm; set model.qk_layernorm={str(family.qk_layernorm).lower()}."
        )
    if m.rotary_percent != 1.0:
        errors.append(
            f"model.rotary_percent={m.rotary_percent}: model.family={name} rotates every channel "
            "of each head; set model.rotary_percent=1.0."
        )
    if m.rope_scaling and not family.uses_rope_scaling:
        errors.append(
            f"model.rope_scaling=true is Llama-3.1's RoPE scaling, which model.family={name} "
            "does not use; set model.rope_scaling=false."
        )
    elif m.rope_scaling and m.rope_scaling_factor <= 0:
        errors.append(f"model.rope_scaling_factor={m.rope_scaling_factor} must be > 0.")
