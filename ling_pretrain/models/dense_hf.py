"""Hugging Face checkpoints of the dense GPT families: the config.json mapping and the tensor
table that ``LlamaForCausalLM`` and ``Qwen3ForCausalLM`` share.

Both store separate ``q_proj`` / ``k_proj`` / ``v_proj`` (kind ``QKV_SPLIT``: megatron's
``linear_qkv`` interleaves them per key/value group), separate ``gate_proj`` / ``up_proj``
(``GLU``), untied ``model.embed_tokens`` and ``lm_head``; Qwen3 adds the per-head
``q_norm`` / ``k_norm`` weights, which the table includes exactly when
``model.qk_layernorm`` is set.

config.json comes in two spellings of RoPE, and both are read: published checkpoints write
``rope_theta`` plus ``rope_scaling`` (null, or ``{"rope_type": "llama3", "factor": ...}``);
transformers 5 writes one ``rope_parameters`` dict holding ``rope_theta`` and the scaling
keys. Exports use the published spelling, which every transformers release reads.
"""

from __future__ import annotations

from typing import Any

from ling_pretrain.checkpoint.hf.adapter import HFAdapter, same_value
from ling_pretrain.checkpoint.hf.rules import COLUMN, GLU, QKV_SPLIT, REPLICATED, ROW, Rule
from ling_pretrain.core.errors import ConfigError

LLAMA3_FIXED_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
"""The llama3 RoPE-scaling parameters megatron-core's ``RotaryEmbedding._apply_scaling``
hard-codes (only ``factor`` reaches it through ``GPTModel``); Llama-3.1 and 3.2 use exactly
these. A checkpoint with other values is refused rather than built with the wrong
frequencies."""

# ModelConfig field -> HF config.json key, for fields copied as they are.
DIRECT_FIELDS: dict[str, str] = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "layernorm_epsilon": "rms_norm_eps",
}
# Derived fields and the HF keys they come from (for error messages).
DERIVED_FIELDS: dict[str, str] = {
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "rotary_base": "rope_theta",
    "rotary_percent": "partial_rotary_factor",
    "rope_scaling": "rope_scaling.rope_type",
    "rope_scaling_factor": "rope_scaling.factor",
    "qk_layernorm": "model_type",
    "mtp_num_layers": "model_type",
}
# HF features these models do not have: key -> (the value we support, what it means).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "tie_word_embeddings": (False, "tied input/output embeddings"),
    "attention_bias": (False, "attention (QKV and output) biases"),
    "mlp_bias": (False, "MLP biases"),
    "hidden_act": ("silu", "the MLP activation"),
}

LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
    Rule(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        QKV_SPLIT,
        True,
    ),
    Rule("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), REPLICATED),
    Rule("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), REPLICATED),
    Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW, True),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU, True),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW, True),
)
"""Tensors of one decoder layer: megatron ``decoder.layers.{L}.<mcore>`` <-> HF
``model.layers.{L}.<hf>``."""

MODEL_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), COLUMN),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    Rule("output_layer.weight", ("lm_head.weight",), COLUMN),
)
"""Whole-model tensors (full names on both sides)."""

_QK_NORM_RULES = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")


def rope_config(hf: dict, default_theta: float) -> tuple[float, dict]:
    """RoPE theta and the scaling dict (empty without scaling) of either config.json spelling.

    ``rope_parameters`` (transformers 5) wins over ``rope_theta`` + ``rope_scaling``.
    """
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        scaling = dict(params)
        theta = scaling.pop("rope_theta", hf.get("rope_theta", default_theta))
    else:
        scaling = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", default_theta)
    scaling.pop("partial_rotary_factor", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), ({} if rope_type == "default" else scaling)


def _partial_rotary_factor(hf: dict) -> float:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(hf.get("partial_rotary_factor") or 1.0)


class DenseHFAdapter(HFAdapter):
    """config.json and tensor table of a dense Llama-style checkpoint; subclasses set the
    class attributes and may add :meth:`family_problems` and :meth:`extra_config`."""

    architecture: str
    """``architectures[0]`` of the checkpoints (e.g. ``LlamaForCausalLM``)."""
    qk_layernorm: bool
    """Whether its checkpoints hold ``q_norm`` / ``k_norm`` weights."""
    uses_rope_scaling: bool
    """Whether ``rope_type: llama3`` is accepted."""
    default_rope_theta: float = 10000.0
    """transformers' ``rope_theta`` when config.json has none."""
    special_tokens: dict[int, tuple[int, int]] = {}
    """Vocabulary size -> (bos, eos) token ids of the published tokenizer; other vocabularies
    (the built-in corpus tokenizer's) get 0, its ``<|endoftext|>``."""
    model_rules = MODEL_RULES
    layer_rules = LAYER_RULES

    def layer_has(self, rule: Rule, model_cfg: Any, layer: int, mtp: bool) -> bool:
        return bool(model_cfg.qk_layernorm) or rule.mcore not in _QK_NORM_RULES

    def family_problems(self, hf: dict) -> list[str]:
        """config.json features of this family's checkpoints that the model does not have."""
        return []

    def extra_config(self, model_cfg: Any) -> dict:
        """Family-specific keys of an exported config.json."""
        return {}

    def _problems(self, hf: dict) -> list[str]:
        problems = []
        what = self.architecture
        model_type = hf.get("model_type")
        if model_type not in (None, *self.model_types):
            problems.append(f"config.json model_type={model_type!r} is not a {what} checkpoint.")
        for key, (ok, meaning) in UNSUPPORTED.items():
            if key in hf and hf[key] is not None and hf[key] != ok:
                problems.append(
                    f"config.json {key}={hf[key]!r}: {meaning} are not part of the {what} model "
                    f"this trainer builds (it needs {key}={ok!r}); this checkpoint cannot be loaded."
                )
        if _partial_rotary_factor(hf) != 1.0:
            problems.append(
                f"config.json partial_rotary_factor={_partial_rotary_factor(hf)}: partial RoPE is "
                f"not part of the {what} model this trainer builds."
            )
        _, scaling = rope_config(hf, self.default_rope_theta)
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type != "llama3" or not self.uses_rope_scaling:
                problems.append(
                    f"config.json RoPE scaling rope_type={rope_type!r} is not supported for "
                    f"{what} (only Llama-3.1's 'llama3' scaling, for Llama)."
                )
            else:
                for key, fixed in LLAMA3_FIXED_ROPE.items():
                    if not same_value(float(scaling.get(key, fixed)), float(fixed)):
                        problems.append(
                            f"config.json rope_scaling {key}={scaling.get(key)!r}: megatron-core "
                            f"computes llama3 RoPE scaling with {key}={fixed} (only the factor "
                            "is configurable), so this checkpoint would run with other RoPE "
                            "frequencies."
                        )
                if "factor" not in scaling:
                    problems.append("config.json rope_scaling (llama3) has no 'factor'.")
        return problems + self.family_problems(hf)

    def model_fields(self, hf_config: dict) -> dict[str, Any]:
        """Our ``ModelConfig`` field values for this family's HF ``config.json``.

        Raises:
            ConfigError: the checkpoint uses a feature this model does not have (biases, tied
                embeddings, another activation, partial RoPE, another RoPE scaling), or a
                required key is missing.
        """
        hf = hf_config
        problems = self._problems(hf)
        required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
        problems += [f"config.json has no {k!r}." for k in required if k not in hf]
        if problems:
            raise ConfigError(
                "unsupported Hugging Face config:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        out: dict[str, Any] = {}
        for ours, theirs in DIRECT_FIELDS.items():
            if theirs in hf and hf[theirs] is not None:
                out[ours] = hf[theirs]
        out["layernorm_epsilon"] = float(out.get("layernorm_epsilon", 1e-6))
        out["num_query_groups"] = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
        out["kv_channels"] = int(
            hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        )
        theta, scaling = rope_config(hf, self.default_rope_theta)
        out["rotary_base"] = int(theta) if theta.is_integer() else theta
        out["rotary_percent"] = 1.0
        out["rope_scaling"] = bool(scaling)
        if scaling:
            out["rope_scaling_factor"] = float(scaling["factor"])
        out["qk_layernorm"] = self.qk_layernorm
        out["mtp_num_layers"] = 0
        return out

    def check_config(
        self, hf_config: dict, model_cfg: Any, *, init_missing_mtp: bool = False
    ) -> None:
        """Refuse an HF config.json that does not describe the chosen model preset.

        Raises:
            ConfigError: naming every mismatching field (HF key and value, our field and value)
                and the fix.
        """
        problems = self._problems(hf_config)
        if not problems:
            for field, value in self.model_fields(hf_config).items():
                ours = getattr(model_cfg, field)
                if not same_value(ours, value):
                    problems.append(
                        f"config.json {self._source(field, hf_config)} but model.{field}={ours!r}: "
                        f"add model.{field}={value!r}, pick the preset this checkpoint was made "
                        "from, or leave out +model= where the command derives the model from "
                        "config.json."
                    )
        if problems:
            name = getattr(model_cfg, "name", "?")
            raise ConfigError(
                f"the Hugging Face checkpoint does not match model {name} "
                f"({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems)
            )

    def _source(self, field: str, hf: dict) -> str:
        """The config.json key(s) and value(s) a ModelConfig field comes from, for messages."""
        if field in DIRECT_FIELDS:
            return f"{DIRECT_FIELDS[field]}={hf.get(DIRECT_FIELDS[field])!r}"
        theta, scaling = rope_config(hf, self.default_rope_theta)
        if field == "rotary_base":
            return f"rope_theta={theta!r}"
        if field in ("rope_scaling", "rope_scaling_factor"):
            return f"RoPE scaling {scaling or None!r}"
        if field in ("qk_layernorm", "mtp_num_layers"):
            return f"model_type={hf.get('model_type')!r} (a {self.architecture})"
        key = DERIVED_FIELDS.get(field, field)
        return f"{key}={hf.get(key)!r}"

    def config_json(self, model_cfg: Any, *, torch_dtype: str = "bfloat16") -> dict:
        """A complete config.json for our ``ModelConfig`` (inverse of :meth:`model_fields`),
        in the spelling of the published checkpoints (``rope_theta`` + ``rope_scaling``)."""
        m = model_cfg
        bos, eos = self.special_tokens.get(m.vocab_size, (0, 0))
        rope_scaling = None
        if m.rope_scaling:
            rope_scaling = {
                "factor": float(m.rope_scaling_factor),
                **LLAMA3_FIXED_ROPE,
                "rope_type": "llama3",
            }
        return {
            "architectures": [self.architecture],
            "model_type": self.model_types[0],
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups,
            "head_dim": m.kv_channels,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rms_norm_eps": m.layernorm_epsilon,
            "tie_word_embeddings": False,
            "initializer_range": m.init_method_std,
            "max_position_embeddings": m.max_position_embeddings,
            "rope_theta": float(m.rotary_base),
            "rope_scaling": rope_scaling,
            "use_cache": True,
            "bos_token_id": bos,
            "eos_token_id": eos,
            **self.extra_config(m),
            "torch_dtype": torch_dtype,
        }
