"""Dense Qwen3 Hugging Face checkpoints (``Qwen3ForCausalLM``): the shared dense table
(:mod:`ling_pretrain.models.dense_hf`) with the ``q_norm`` / ``k_norm`` weights."""

from __future__ import annotations

from typing import Any

from ling_pretrain.models.dense_hf import DenseHFAdapter

QWEN3_VOCAB_SIZE = 151936
QWEN3_ENDOFTEXT = 151643
"""``<|endoftext|>``: bos and the base models' eos (the instruct models end turns with
``<|im_end|>``, 151645)."""


class Qwen3HFAdapter(DenseHFAdapter):
    """``model_type`` ``qwen3`` checkpoints (dense; ``qwen3_moe`` is another format)."""

    model_types = ("qwen3",)
    architecture = "Qwen3ForCausalLM"
    qk_layernorm = True
    uses_rope_scaling = False
    special_tokens = {QWEN3_VOCAB_SIZE: (QWEN3_ENDOFTEXT, QWEN3_ENDOFTEXT)}

    def family_problems(self, hf: dict) -> list[str]:
        problems = []
        if hf.get("use_sliding_window"):
            problems.append(
                "config.json use_sliding_window=true: sliding-window attention is not part of "
                "the Qwen3 model this trainer builds (full causal attention in every layer)."
            )
        other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
        if other:
            problems.append(
                f"config.json layer_types has {other}: only full_attention layers are built."
            )
        return problems

    def extra_config(self, model_cfg: Any) -> dict:
        return {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": model_cfg.num_layers,
        }
