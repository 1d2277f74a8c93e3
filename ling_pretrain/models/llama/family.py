"""Llama 3.x on megatron-core's GPT model.

RMSNorm, grouped-query attention without biases and without QK-norm, full NeoX-style RoPE
with Llama-3.1's frequency scaling (megatron-core's ``rope_scaling``), a SwiGLU MLP and
untied embeddings: the shared dense architecture (:mod:`ling_pretrain.models.dense`) with
QK-norm off.
"""

from __future__ import annotations

from ling_pretrain.models.dense import DenseGPTFamily
from ling_pretrain.models.llama.hf import LlamaHFAdapter


class LlamaFamily(DenseGPTFamily):
    """Llama-3.1-8B and the tiny CPU model."""

    name = "llama"
    default_preset = "llama31_8b"
    example_preset = "llama31_8b"
    hf = LlamaHFAdapter()
    qk_layernorm = False
    uses_rope_scaling = True
