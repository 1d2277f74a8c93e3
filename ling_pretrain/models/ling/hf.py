"""Ling 2.0 (BailingMoeV2) Hugging Face checkpoints: the config.json mapping and the tensor table.

Published Ling 2.0 checkpoints are HF safetensors in the ``bailing_moe_v2`` layout (see
``docs/conversion.md``). The peers' converters dropped the expert bias and the MTP layer and
broke at EP > 1; here one table maps every megatron tensor to its HF tensors, and the generic
engine (:mod:`ling_pretrain.checkpoint.hf`) reads it both ways:

* ``attention.query_key_value`` is one fused ``[Q|K|V]`` tensor (kind ``QKV``);
* dense MLP, shared and routed experts store ``gate_proj`` / ``up_proj`` separately (``GLU``);
* MTP layer ``j`` is HF layer ``num_hidden_layers + j``: ``enorm``, ``hnorm``, ``eh_proj``
  (input ``[embedding, hidden]`` in both), ``final_layernorm`` and all decoder-layer keys;
* the expert bias is fp32 in memory, in megatron checkpoints and in every export;
* an FP8 export keeps embeddings, lm_head, norms, the router, the expert bias and MTP's
  ``eh_proj`` in high precision.
"""

from __future__ import annotations

from typing import Any

from ling_pretrain.checkpoint.hf.adapter import HFAdapter, same_value
from ling_pretrain.checkpoint.hf.rules import COLUMN, GLU, QKV, REPLICATED, ROW, Rule
from ling_pretrain.core.errors import ConfigError

LING_EOS_TOKEN_ID = 156892
"""``<|endoftext|>``: eos, pad and the end-of-document token of Ling's tokenizer."""
LING_VOCAB_SIZE = 157184

# ModelConfig field -> HF config.json key, for fields that are copied as they are.
_DIRECT_FIELDS: dict[str, str] = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "intermediate_size",
    "first_k_dense_replace": "first_k_dense_replace",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "layernorm_epsilon": "rms_norm_eps",
    "num_moe_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_router_topk": "num_experts_per_tok",
    "moe_router_num_groups": "n_group",
    "moe_router_group_topk": "topk_group",
    "moe_router_topk_scaling_factor": "routed_scaling_factor",
    "moe_router_score_function": "score_function",
    "moe_router_enable_expert_bias": "moe_router_enable_expert_bias",
}
# Derived fields and the HF keys they come from (for error messages).
_DERIVED_FIELDS: dict[str, str] = {
    "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim",
    "rotary_percent": "partial_rotary_factor / rotary_dim",
    "rotary_base": "rope_theta",
    "moe_shared_expert_intermediate_size": "num_shared_experts x moe_intermediate_size",
    "mtp_num_layers": "num_nextn_predict_layers",
}
# HF features our model does not have: key -> (value we support, what it means).
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_qkv_bias": (False, "QKV biases"),
    "use_bias": (False, "linear biases"),
    "tie_word_embeddings": (False, "tied input/output embeddings"),
    "hidden_act": ("silu", "the MLP activation"),
    "use_qk_norm": (True, "QK-norm"),
    "norm_topk_prob": (True, "normalised top-k weights"),
    "rope_scaling": (None, "RoPE scaling (YaRN)"),
}


def _hf_head_dim(hf: dict) -> int:
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


def _hf_rotary_percent(hf: dict) -> float:
    rotary_dim = hf.get("rotary_dim")
    if rotary_dim:
        return float(rotary_dim) / _hf_head_dim(hf)
    return float(hf.get("partial_rotary_factor", 1.0))


def _unsupported_features(hf: dict) -> list[str]:
    problems = []
    for key, (ok, what) in _UNSUPPORTED.items():
        if key in hf and hf[key] != ok and not (ok is None and not hf[key]):
            problems.append(
                f"config.json {key}={hf[key]!r}: {what} are not part of the Ling 2.0 model "
                f"this trainer builds (it needs {key}={ok!r}); this checkpoint cannot be loaded."
            )
    model_type = hf.get("model_type")
    if model_type not in (None, "bailing_moe_v2", "bailing_moe"):
        problems.append(
            f"config.json model_type={model_type!r} is not a BailingMoeV2 (Ling 2.0) checkpoint."
        )
    return problems


LAYER_RULES: tuple[Rule, ...] = (
    Rule("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED),
    Rule("self_attention.linear_qkv.weight", ("attention.query_key_value.weight",), QKV, True),
    Rule("self_attention.q_layernorm.weight", ("attention.query_layernorm.weight",), REPLICATED),
    Rule("self_attention.k_layernorm.weight", ("attention.key_layernorm.weight",), REPLICATED),
    Rule("self_attention.linear_proj.weight", ("attention.dense.weight",), ROW, True),
    Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU, True),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW, True),
    Rule("mlp.router.weight", ("mlp.gate.weight",), REPLICATED),
    Rule("mlp.router.expert_bias", ("mlp.gate.expert_bias",), REPLICATED, fp32=True),
    Rule(
        "mlp.experts.{E}.linear_fc1.weight",
        ("mlp.experts.{E}.gate_proj.weight", "mlp.experts.{E}.up_proj.weight"),
        GLU,
        True,
    ),
    Rule("mlp.experts.{E}.linear_fc2.weight", ("mlp.experts.{E}.down_proj.weight",), ROW, True),
    Rule(
        "mlp.shared_experts.linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        GLU,
        True,
    ),
    Rule(
        "mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",), ROW, True
    ),
)
"""Tensors of one transformer layer: megatron ``decoder.layers.{L}.<mcore>`` (or
``mtp.layers.{j}.transformer_layer.<mcore>``) <-> HF ``model.layers.{i}.<hf>``."""

MTP_RULES: tuple[Rule, ...] = (
    Rule("enorm.weight", ("enorm.weight",), REPLICATED),
    Rule("hnorm.weight", ("hnorm.weight",), REPLICATED),
    Rule("eh_proj.weight", ("eh_proj.weight",), COLUMN),
    Rule("final_layernorm.weight", ("final_layernorm.weight",), REPLICATED),
)
"""MTP-only tensors: megatron ``mtp.layers.{j}.<mcore>`` <-> HF
``model.layers.{num_layers + j}.<hf>``."""

MODEL_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.word_embeddings.weight",), COLUMN),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    Rule("output_layer.weight", ("lm_head.weight",), COLUMN),
)
"""Whole-model tensors (full names on both sides)."""


_MOE_PREFIXES = ("mlp.router", "mlp.experts", "mlp.shared_experts")


class LingHFAdapter(HFAdapter):
    """BailingMoeV2 checkpoints (``model_type`` ``bailing_moe_v2``)."""

    model_types = ("bailing_moe_v2", "bailing_moe")
    model_rules = MODEL_RULES
    layer_rules = LAYER_RULES
    mtp_rules = MTP_RULES

    def layer_has(self, rule: Rule, model_cfg: Any, layer: int, mtp: bool) -> bool:
        m = model_cfg
        if not rule.mcore.startswith("mlp."):
            return True
        moe = m.first_k_dense_replace < m.num_layers if mtp else layer >= m.first_k_dense_replace
        if moe != rule.mcore.startswith(_MOE_PREFIXES):
            return False
        if rule.mcore.startswith("mlp.shared_experts"):
            return bool(m.moe_shared_expert_intermediate_size)
        if rule.mcore == "mlp.router.expert_bias":
            return bool(m.moe_router_enable_expert_bias)
        return True

    def mtp_layers(self, hf_config: dict) -> int:
        return int(hf_config.get("num_nextn_predict_layers") or 0)

    def fp8_not_converted(self, model_cfg: Any) -> list[str]:
        return ["lm_head"] + [
            f"model.layers.{model_cfg.num_layers + j}.eh_proj"
            for j in range(model_cfg.mtp_num_layers)
        ]

    def model_fields(self, hf_config: dict) -> dict[str, Any]:
        """Our ``ModelConfig`` field values for an HF BailingMoeV2 ``config.json``.

        ``rotary_dim`` (Ling-1T) and ``partial_rotary_factor`` (mini, flash) are both accepted;
        ``rotary_dim`` wins when both are present. Fields HF configs do not carry (``name``,
        initialisation, loss coefficients, bias update rate) are not returned.

        Raises:
            ConfigError: the checkpoint uses a feature this model does not have (biases, tied
                embeddings, another activation, RoPE scaling), or a required key is missing.
        """
        hf = hf_config
        problems = _unsupported_features(hf)
        required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
        problems += [f"config.json has no {k!r}." for k in required if k not in hf]
        if problems:
            raise ConfigError(
                "unsupported Hugging Face config:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        out: dict[str, Any] = {}
        for ours, theirs in _DIRECT_FIELDS.items():
            if theirs in hf and hf[theirs] is not None:
                out[ours] = hf[theirs]
        out["num_query_groups"] = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
        out["kv_channels"] = _hf_head_dim(hf)
        out["rotary_percent"] = _hf_rotary_percent(hf)
        if "rope_theta" in hf:
            theta = float(hf["rope_theta"])
            out["rotary_base"] = int(theta) if theta.is_integer() else theta
        shared = int(hf.get("num_shared_experts") or 0)
        out["moe_shared_expert_intermediate_size"] = shared * int(
            hf.get("moe_intermediate_size", 0)
        )
        out["mtp_num_layers"] = int(hf.get("num_nextn_predict_layers") or 0)
        for key in ("layernorm_epsilon", "moe_router_topk_scaling_factor", "rotary_percent"):
            if key in out:
                out[key] = float(out[key])
        return out

    def check_config(
        self, hf_config: dict, model_cfg: Any, *, init_missing_mtp: bool = False
    ) -> None:
        """Refuse an HF config.json that does not describe the chosen model preset.

        Args:
            hf_config: the checkpoint's config.json.
            model_cfg: our ``ModelConfig`` (``cfg.model``).
            init_missing_mtp: accept a checkpoint without MTP layers for a model with MTP (its
                MTP layers keep their fresh initialisation).

        Raises:
            ConfigError: naming every mismatching field (HF key and value, our field and value)
                and the fix.
        """
        problems = list(_unsupported_features(hf_config))
        if not problems:
            wanted = self.model_fields(hf_config)
            no_mtp = self.lacks_mtp(hf_config, model_cfg)
            if no_mtp and init_missing_mtp:
                wanted.pop("mtp_num_layers")
            for field, value in wanted.items():
                ours = getattr(model_cfg, field)
                if field == "mtp_num_layers" and no_mtp:
                    problems.append(
                        f"config.json {_hf_source(field, hf_config)}: the checkpoint has no MTP "
                        f"layer but model.mtp_num_layers={ours!r}. To add MTP to it, set "
                        "checkpoint.hf_init_missing_mtp=true (launch/convert.py hf-to-mcore: "
                        "--init-missing-mtp): every other tensor loads and the MTP layer keeps its "
                        "fresh initialisation. Or train without MTP: model.mtp_num_layers=0."
                    )
                elif not same_value(ours, value):
                    problems.append(
                        f"config.json {_hf_source(field, hf_config)} but model.{field}={ours!r}: add "
                        f"model.{field}={value!r}, pick the preset this checkpoint was made from, "
                        "or leave out +model= where the command derives the model from config.json."
                    )
        if problems:
            name = getattr(model_cfg, "name", "?")
            raise ConfigError(
                f"the Hugging Face checkpoint does not match model {name} "
                f"({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems)
            )

    def config_json(self, model_cfg: Any, *, torch_dtype: str = "bfloat16") -> dict:
        """A complete BailingMoeV2 ``config.json`` for our ``ModelConfig`` (inverse of
        :meth:`model_fields`).

        eos/pad are 156892 (``<|endoftext|>``) for Ling's 157184-token vocabulary, else 0 (the
        built-in corpus tokenizer's ``<|endoftext|>``).
        """
        m = model_cfg
        shared = m.moe_shared_expert_intermediate_size
        if shared % m.moe_ffn_hidden_size:
            raise ConfigError(
                f"model.moe_shared_expert_intermediate_size={shared} is not a multiple of "
                f"moe_ffn_hidden_size={m.moe_ffn_hidden_size}; HF configs count shared experts "
                "(num_shared_experts x moe_intermediate_size)."
            )
        eos = LING_EOS_TOKEN_ID if m.vocab_size == LING_VOCAB_SIZE else 0
        head_dim = m.kv_channels
        rotary_base = float(m.rotary_base)
        return {
            "architectures": ["BailingMoeV2ForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                "AutoModel": "modeling_bailing_moe_v2.BailingMoeV2Model",
                "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
            },
            "model_type": "bailing_moe_v2",
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_query_groups,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "use_qkv_bias": False,
            "use_bias": False,
            "use_qk_norm": True,
            "rms_norm_eps": m.layernorm_epsilon,
            "tie_word_embeddings": False,
            "embedding_dropout": 0.0,
            "attention_dropout": 0.0,
            "output_dropout": 0.0,
            "initializer_range": m.init_method_std,
            "max_position_embeddings": m.max_position_embeddings,
            "rope_theta": rotary_base,
            "rope_scaling": None,
            "partial_rotary_factor": m.rotary_percent,
            "rotary_dim": int(round(head_dim * m.rotary_percent)),
            "use_cache": True,
            "max_window_layers": m.num_layers,
            "num_experts": m.num_moe_experts,
            "num_shared_experts": shared // m.moe_ffn_hidden_size,
            "num_experts_per_tok": m.moe_router_topk,
            "n_group": m.moe_router_num_groups,
            "topk_group": m.moe_router_group_topk,
            "moe_intermediate_size": m.moe_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": shared,
            "first_k_dense_replace": m.first_k_dense_replace,
            "score_function": m.moe_router_score_function,
            "moe_router_enable_expert_bias": m.moe_router_enable_expert_bias,
            "routed_scaling_factor": m.moe_router_topk_scaling_factor,
            "norm_topk_prob": True,
            "router_dtype": "fp32",
            "output_router_logits": False,
            "num_nextn_predict_layers": m.mtp_num_layers,
            "mtp_loss_scaling_factor": m.mtp_loss_scaling_factor,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "torch_dtype": torch_dtype,
        }


def _hf_source(field: str, hf: dict) -> str:
    """The config.json key(s) and value(s) a ModelConfig field comes from, for messages."""
    if field in _DIRECT_FIELDS:
        return f"{_DIRECT_FIELDS[field]}={hf.get(_DIRECT_FIELDS[field])!r}"
    if field == "rotary_percent":
        if hf.get("rotary_dim"):
            return f"rotary_dim={hf['rotary_dim']} (of head_dim={_hf_head_dim(hf)})"
        return f"partial_rotary_factor={hf.get('partial_rotary_factor', 1.0)!r}"
    if field == "moe_shared_expert_intermediate_size":
        return (
            f"num_shared_experts={hf.get('num_shared_experts')!r} x moe_intermediate_size="
            f"{hf.get('moe_intermediate_size')!r}"
        )
    key = _DERIVED_FIELDS.get(field, field)
    return f"{key}={hf.get(key)!r}"
