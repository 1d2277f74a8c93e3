"""Llama 3.x Hugging Face checkpoints (``LlamaForCausalLM``): the shared dense table
(:mod:`ling_pretrain.models.dense_hf`) without QK-norm, with llama3 RoPE scaling."""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.dense_hf import DenseHFAdapter

LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001
"""``<|begin_of_text|>`` and ``<|end_of_text|>`` of the Llama 3 tokenizer (the base models'
eos)."""


class LlamaHFAdapter(DenseHFAdapter):
    """``model_type`` ``llama`` checkpoints."""

    model_types = ("llama",)
    architecture = "LlamaForCausalLM"
    qk_layernorm = False
    uses_rope_scaling = True
    special_tokens = {LLAMA3_VOCAB_SIZE: (LLAMA3_BOS, LLAMA3_EOS)}

    def extra_config(self, model_cfg: Any) -> dict:
        return {"mlp_bias": False, "pretraining_tp": 1}
