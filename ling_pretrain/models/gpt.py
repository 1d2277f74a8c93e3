"""What every family here maps the same way onto megatron-core's GPT model: a pre-norm
decoder with RMSNorm, SwiGLU MLPs, no biases, no dropout, RoPE and untied embeddings.
Families add their own fields (experts, MTP) on top."""

from __future__ import annotations

from typing import Any


def decoder_kwargs(model_cfg: Any) -> dict[str, Any]:
    """The decoder's part of megatron-core's ``TransformerConfig``."""
    import torch.nn.functional as F  # torch is not needed to count or check a model

    m = model_cfg
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=m.qk_layernorm,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
    )


def rope_gpt_model_kwargs(model_cfg: Any) -> dict[str, Any]:
    """megatron-core ``GPTModel`` arguments: vocabulary, positions, RoPE (with Llama-3.1's
    frequency scaling when ``model.rope_scaling``), untied embeddings."""
    m = model_cfg
    return dict(
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_scaling=m.rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
    )
