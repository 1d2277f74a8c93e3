"""Dense Qwen3 on megatron-core's GPT model.

The shared dense architecture (:mod:`ling_pretrain.models.dense`) with QK-norm: an RMSNorm
over each query and key head (one weight of size ``head_dim`` shared by all heads) before
RoPE, as in Ling 2.0. ``head_dim`` is independent of ``hidden_size / num_attention_heads``
(Qwen3-0.6B has 128 against 1024 / 16). No RoPE scaling.
"""

from __future__ import annotations

from ling_pretrain.models.dense import DenseGPTFamily
from ling_pretrain.models.qwen3.hf import Qwen3HFAdapter


class Qwen3Family(DenseGPTFamily):
    """Qwen3-8B and the tiny CPU model."""

    name = "qwen3"
    default_preset = "qwen3_8b"
    example_preset = "qwen3_8b"
    hf = Qwen3HFAdapter()
    qk_layernorm = True
    uses_rope_scaling = False
