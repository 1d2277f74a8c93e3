"""Hugging Face (BailingMoeV2) checkpoints <-> megatron-core Ling 2.0 models, at any layout.

Why this module is written the way it is
----------------------------------------
Published Ling 2.0 checkpoints are HF safetensors in the ``bailing_moe_v2`` layout; training
runs on megatron-core, whose parameters are named, fused and sharded differently. The peers'
converters dropped the expert bias and the MTP layer and broke at EP > 1, so here:

* One table (:data:`LAYER_RULES`, :data:`MTP_RULES`, :data:`MODEL_RULES`) maps every megatron
  tensor to its HF tensors and names the transformation between them. Import
  (:func:`load_hf_into_model`) and export (:func:`export_hf`) both read it, so they cannot
  disagree; the transformations are small pure functions (:func:`qkv_hf_to_mcore`, ...).
* Names are made layout-free first (:func:`canonical_name`): megatron's local layer index
  becomes the global one (``layer.layer_number - 1`` accounts for PP/VPP offsets), the local
  expert index becomes the global expert (``ep_rank * local_experts + i``), and
  TransformerEngine's fused names (``linear_qkv.layer_norm_weight``, grouped-GEMM
  ``linear_fc1.weight{i}``) become the local spec's names. Then a tensor is sliced for its
  tensor-parallel rank (TP for dense weights, expert-TP for routed experts).
* Import streams: each rank opens the safetensors files lazily and reads only the tensors,
  or the row/column slices, its own parameters need, one at a time. Export is collective:
  tensor-parallel shards are all-gathered, and the one owner of each tensor (data-parallel
  rank 0 of its pipeline stage / expert rank) writes it into its own shard files, flushed
  every ``max_shard_bytes``; rank 0 then names the files and writes the index. No rank
  holds more than one shard file's worth of tensors.

Tensor transformations (HF <-> megatron):

* ``query_key_value``: HF rows are ``[all Q heads | all K heads | all V heads]``; megatron's
  ``linear_qkv`` interleaves per key/value group ``[q heads of group g, k_g, v_g]``, and a
  TP rank holds a contiguous block of whole groups.
* SwiGLU ``linear_fc1``: megatron stores ``[gate; up]`` per TP shard, so the full tensor is
  ``[gate_0; up_0; gate_1; up_1; ...]`` and HF's separate ``gate_proj`` / ``up_proj`` are
  re-assembled from the halves of every shard.
* MTP layer ``j`` is HF layer ``num_hidden_layers + j``: ``enorm``, ``hnorm``, ``eh_proj``
  (input ``[embedding, hidden]`` in both), ``final_layernorm`` and all decoder-layer keys.
  A pipeline stage holding MTP but not the embedding keeps its own (tied) embedding copy;
  the loader fills it too, the exporter writes the first stage's.
* The expert bias is fp32 in memory, in megatron checkpoints and in every export.

FP8 export (``dtype="fp8"``) follows DeepSeek-V3's format: the linear weights of attention,
dense MLP, shared and routed experts (MTP's transformer layer included) become E4M3 with one
fp32 ``weight_scale_inv`` per 128x128 block (TransformerEngine's blockwise rules, from
:mod:`ling_pretrain.fp8.quantize`); embeddings, lm_head, norms, the router, the expert bias
and MTP's ``eh_proj`` stay high precision (bf16; the expert bias fp32).

The TransformerEngine name aliases are used on GPUs only and have not run here; the local
spec path is what the CPU tests check.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ling_pretrain.checkpoint.dist import unwrap
from ling_pretrain.config.validate import ConfigError
from ling_pretrain.core.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "HFReader",
    "check_hf_config",
    "export_hf",
    "expected_hf_keys",
    "hf_config_from_model",
    "load_hf_into_model",
    "model_overrides_from_hf",
    "qkv_hf_to_mcore",
    "qkv_mcore_to_hf",
    "read_hf_config",
]

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
LING_EOS_TOKEN_ID = 156892
LING_VOCAB_SIZE = 157184
FP8_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}
TEMPLATE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
    "*.py",
    "*.tiktoken",
    "merges.txt",
    "vocab.json",
    "chat_template*",
)

# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------

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


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of an HF checkpoint directory.

    Raises:
        FileNotFoundError: ``hf_dir`` has no config.json.
    """
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{hf_dir} has no {CONFIG_FILE}: give a Hugging Face checkpoint directory "
            "(config.json + *.safetensors), e.g. a download of inclusionAI/Ling-mini-base-2.0."
        )
    with open(path) as f:
        return json.load(f)


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


def model_overrides_from_hf(hf_config: dict) -> dict[str, object]:
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
    out: dict[str, object] = {}
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
    out["moe_shared_expert_intermediate_size"] = shared * int(hf.get("moe_intermediate_size", 0))
    out["mtp_num_layers"] = int(hf.get("num_nextn_predict_layers") or 0)
    for key in ("layernorm_epsilon", "moe_router_topk_scaling_factor", "rotary_percent"):
        if key in out:
            out[key] = float(out[key])
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


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


def hf_lacks_mtp(hf_config: dict, model_cfg: Any) -> bool:
    """Whether the checkpoint has no MTP layer while the model has some (the case that
    ``checkpoint.hf_init_missing_mtp`` allows)."""
    return not int(hf_config.get("num_nextn_predict_layers") or 0) and model_cfg.mtp_num_layers > 0


def check_hf_config(hf_config: dict, model_cfg: Any, *, init_missing_mtp: bool = False) -> None:
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
        wanted = model_overrides_from_hf(hf_config)
        no_mtp = hf_lacks_mtp(hf_config, model_cfg)
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
            elif not _same(ours, value):
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


def hf_dir_problems(
    hf_dir: str | os.PathLike, model_cfg: Any, *, init_missing_mtp: bool = False
) -> list[str]:
    """Why ``hf_dir`` cannot initialise ``model_cfg`` (empty when it can): the directory,
    its config.json and safetensors exist, and config.json matches the model (see
    :func:`check_hf_config` for ``init_missing_mtp``). Cheap: reads config.json and the
    index only, so it runs before any process group exists."""
    path = Path(hf_dir)
    if not path.is_dir():
        return [f"checkpoint.init_from_hf={hf_dir}: no such directory."]
    try:
        hf = read_hf_config(path)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        return [f"checkpoint.init_from_hf: {err}"]
    if not (path / INDEX_FILE).is_file() and not any(path.glob("*.safetensors")):
        return [
            f"checkpoint.init_from_hf={hf_dir} holds no *.safetensors weights (only .bin? "
            "convert them to safetensors first)."
        ]
    try:
        check_hf_config(hf, model_cfg, init_missing_mtp=init_missing_mtp)
    except ConfigError as err:
        return [f"checkpoint.init_from_hf={hf_dir}: {err}"]
    return []


def hf_config_from_model(model_cfg: Any, *, torch_dtype: str = "bfloat16") -> dict:
    """A complete BailingMoeV2 ``config.json`` for our ``ModelConfig`` (inverse of
    :func:`model_overrides_from_hf`).

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


# --------------------------------------------------------------------------------------------
# The mapping table
# --------------------------------------------------------------------------------------------

REPLICATED = "replicated"
"""Same tensor on every tensor-parallel rank (norms, router, expert bias)."""
COLUMN = "column"
"""Split along dim 0 (output features / vocabulary rows) across tensor-parallel ranks."""
ROW = "row"
"""Split along dim 1 (input features) across tensor-parallel ranks."""
QKV = "qkv"
"""Fused QKV: HF ``[Q|K|V]`` <-> megatron per-group interleave, split by whole groups."""
GLU = "glu"
"""SwiGLU fc1: HF ``gate_proj`` + ``up_proj`` <-> megatron ``[gate; up]`` per TP shard."""


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensors it is made of."""

    mcore: str
    """Megatron name (suffix inside a layer for layer rules); ``{E}`` is the global expert."""
    hf: tuple[str, ...]
    """HF names (suffixes inside ``model.layers.{i}.`` for layer rules)."""
    kind: str
    """How it is transformed and split: REPLICATED, COLUMN, ROW, QKV or GLU."""
    fp8: bool = False
    """Quantised to E4M3 in an FP8 export."""


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
    Rule("mlp.router.expert_bias", ("mlp.gate.expert_bias",), REPLICATED),
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

_LAYER_RULES_BY_NAME = {r.mcore: r for r in LAYER_RULES}
_MTP_RULES_BY_NAME = {r.mcore: r for r in MTP_RULES}
_MODEL_RULES_BY_NAME = {r.mcore: r for r in MODEL_RULES}
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(.*)$")

# TransformerEngine spec names -> local spec names, inside one layer (unverified on GPUs).
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_TE_GROUPED_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class Mapped:
    """Where one megatron tensor of this rank comes from in the HF checkpoint."""

    canonical: str
    """Layout-free megatron name (global layer and expert numbers)."""
    hf_keys: tuple[str, ...]
    """The HF tensors it is built from."""
    rule: Rule
    expert: bool
    """A routed-expert tensor (split by expert-TP, owned per expert rank)."""


def _layer_rule(suffix: str) -> tuple[Rule, str | None] | None:
    """The layer rule for a layer-local name with a global expert number, and the expert."""
    m = _EXPERT_RE.match(suffix)
    if m:
        rule = _LAYER_RULES_BY_NAME.get(f"mlp.experts.{{E}}.{m.group(2)}")
        return (rule, m.group(1)) if rule else None
    rule = _LAYER_RULES_BY_NAME.get(suffix)
    return (rule, None) if rule else None


def map_canonical(canonical: str, num_layers: int) -> Mapped:
    """HF keys and rule of a canonical megatron name.

    Raises:
        KeyError: the name is not in the table.
    """
    if canonical in _MODEL_RULES_BY_NAME:
        rule = _MODEL_RULES_BY_NAME[canonical]
        return Mapped(canonical, rule.hf, rule, False)
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", canonical)
    if m:
        hf_layer, suffix = int(m.group(1)), m.group(2)
    else:
        m = re.match(r"^mtp\.layers\.(\d+)\.(.*)$", canonical)
        if not m:
            raise KeyError(canonical)
        hf_layer, suffix = num_layers + int(m.group(1)), m.group(2)
        if suffix in _MTP_RULES_BY_NAME:
            rule = _MTP_RULES_BY_NAME[suffix]
            return Mapped(
                canonical, tuple(f"model.layers.{hf_layer}.{h}" for h in rule.hf), rule, False
            )
        if not suffix.startswith("transformer_layer."):
            raise KeyError(canonical)
        suffix = suffix[len("transformer_layer.") :]
    found = _layer_rule(suffix)
    if found is None:
        raise KeyError(canonical)
    rule, expert = found
    keys = tuple(f"model.layers.{hf_layer}.{h.replace('{E}', expert or '')}" for h in rule.hf)
    return Mapped(canonical, keys, rule, expert is not None)


def expected_hf_keys(model_cfg: Any, *, with_mtp: bool = True) -> list[str]:
    """Every tensor name an HF checkpoint of this model holds (from the same table); without
    the MTP layers' tensors when ``with_mtp`` is False."""
    m = model_cfg
    keys = [k for r in MODEL_RULES for k in r.hf]

    def layer(i: int, moe: bool) -> list[str]:
        out = []
        for rule in LAYER_RULES:
            is_moe = rule.mcore.startswith(("mlp.router", "mlp.experts", "mlp.shared_experts"))
            if (
                rule.mcore.startswith("mlp.shared_experts")
                and not m.moe_shared_expert_intermediate_size
            ):
                continue
            if rule.mcore == "mlp.router.expert_bias" and not m.moe_router_enable_expert_bias:
                continue
            if moe != is_moe and rule.mcore.startswith("mlp."):
                continue
            experts = range(m.num_moe_experts) if "{E}" in rule.mcore else [None]
            for e in experts:
                out += [f"model.layers.{i}.{h.replace('{E}', str(e))}" for h in rule.hf]
        return out

    for i in range(m.num_layers):
        keys += layer(i, i >= m.first_k_dense_replace)
    for j in range(m.mtp_num_layers if with_mtp else 0):
        i = m.num_layers + j
        keys += [f"model.layers.{i}.{h}" for r in MTP_RULES for h in r.hf]
        keys += layer(i, m.first_k_dense_replace < m.num_layers)
    return keys


# --------------------------------------------------------------------------------------------
# Pure transformations
# --------------------------------------------------------------------------------------------


def qkv_hf_to_mcore(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """HF ``[Q|K|V]`` rows -> megatron's per-group ``[q_g..., k_g, v_g]`` rows."""
    hidden = w.shape[-1]
    per = heads // groups
    q = w[: heads * head_dim].reshape(groups, per * head_dim, hidden)
    k = w[heads * head_dim : (heads + groups) * head_dim].reshape(groups, head_dim, hidden)
    v = w[(heads + groups) * head_dim :].reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_mcore_to_hf(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Megatron's per-group interleaved QKV rows -> HF ``[Q|K|V]`` (inverse of the above)."""
    hidden = w.shape[-1]
    per = heads // groups
    g = w.reshape(groups, (per + 2) * head_dim, hidden)
    q = g[:, : per * head_dim].reshape(-1, hidden)
    k = g[:, per * head_dim : (per + 1) * head_dim].reshape(-1, hidden)
    v = g[:, (per + 1) * head_dim :].reshape(-1, hidden)
    return torch.cat([q, k, v], dim=0)


def _split(n: int, size: int, rank: int, what: str) -> slice:
    if n % size:
        raise ValueError(f"{what}: {n} is not divisible by the tensor-parallel size {size}")
    step = n // size
    return slice(rank * step, (rank + 1) * step)


# --------------------------------------------------------------------------------------------
# Reading HF safetensors, streaming
# --------------------------------------------------------------------------------------------


SCALE_INV_SUFFIX = "_scale_inv"
"""Suffix of the per-block inverse scales of an FP8 weight: ``<name>.weight_scale_inv``."""


def _fp8_weight_block(hf_dir: Path) -> tuple[int, int]:
    """The block shape of an FP8 checkpoint's ``weight_scale_inv`` tensors (128x128 default)."""
    path = hf_dir / CONFIG_FILE
    quant = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not quant:
        return FP8_BLOCK
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"{hf_dir}: quantization_config {quant} is not a blockwise E4M3 FP8 checkpoint; "
            "only bf16/fp32 checkpoints and DeepSeek-V3-style FP8 ones (quant_method fp8, "
            "fmt e4m3, weight_block_size) can be loaded."
        )
    block = quant.get("weight_block_size") or list(FP8_BLOCK)
    return int(block[0]), int(block[1])


class HFReader:
    """Lazy access to the tensors of an HF checkpoint (single file or sharded with an index).

    Files are opened with ``safetensors.safe_open`` when first needed; ``get`` reads one
    tensor, or one row/column range of it, without loading anything else.

    FP8 checkpoints (DeepSeek-V3 style, as :func:`export_hf` writes with ``dtype="fp8"``)
    are read as the fp32 values they stand for: a weight stored with a ``weight_scale_inv``
    companion is dequantised block by block (``weight_block_size`` from config.json's
    ``quantization_config``, 128x128 by default) and the scale tensors are not listed in
    :meth:`keys`.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            with open(index) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"{self.dir} holds no *.safetensors files (and no {INDEX_FILE}); give a "
                    "Hugging Face checkpoint directory."
                )
            from safetensors import safe_open

            self.weight_map = {}
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        self.weight_map[key] = path.name
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{self.dir}/{INDEX_FILE} names files that are not there: {', '.join(missing[:5])}"
            )
        self._handles: dict[str, Any] = {}
        self.block = _fp8_weight_block(self.dir)

    def keys(self) -> list[str]:
        return [k for k in self.weight_map if not k.endswith(".weight" + SCALE_INV_SUFFIX)]

    def _scale_key(self, key: str) -> str | None:
        scale = key + SCALE_INV_SUFFIX
        return scale if key.endswith(".weight") and scale in self.weight_map else None

    def _file(self, key: str) -> Any:
        from safetensors import safe_open

        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.dir / name), framework="pt")
        return self._handles[name]

    def shape(self, key: str) -> list[int]:
        return list(self._file(key).get_slice(key).get_shape())

    def get(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """One tensor, or a row range / column range of a 2-D tensor."""
        scale_key = self._scale_key(key)
        if scale_key is not None:
            from ling_pretrain.fp8.quantize import dequantize_blockwise

            q = self._file(key).get_tensor(key)
            scale_inv = self._file(scale_key).get_tensor(scale_key)
            full = dequantize_blockwise(q, scale_inv, self.block)
            return full[rows or slice(None), cols or slice(None)]
        if rows is None and cols is None:
            return self._file(key).get_tensor(key)
        part = self._file(key).get_slice(key)
        if cols is None:
            return part[rows]
        return part[rows or slice(None), cols]

    def close(self) -> None:
        self._handles.clear()


# --------------------------------------------------------------------------------------------
# This rank's tensors
# --------------------------------------------------------------------------------------------


@dataclass
class _Parallel:
    tp: int
    tp_rank: int
    etp: int
    etp_rank: int
    ep_rank: int
    dp_rank: int
    expert_dp_rank: int

    @staticmethod
    def current() -> _Parallel:
        from megatron.core import parallel_state as ps

        return _Parallel(
            tp=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            expert_dp_rank=ps.get_expert_data_parallel_rank(),
        )


def _num_local_experts(layer: Any) -> int:
    experts = getattr(layer.mlp, "experts", None)
    if experts is None:
        return 0
    n = getattr(experts, "num_local_experts", None)
    if n is None:
        n = len(experts.local_experts)
    return int(n)


def canonical_name(local: str, chunk: Any, ep_rank: int) -> str | None:
    """Layout-free name of a parameter/buffer of ``chunk``; None for non-tensor state.

    Local layer indices become global ones (``layer_number - 1``), local experts global
    experts, and TransformerEngine's fused names the local spec's.
    """
    if local.endswith("_extra_state"):
        return None
    m = re.match(r"^(decoder\.layers|mtp\.layers)\.(\d+)\.(.*)$", local)
    if not m:
        return local
    block, idx, suffix = m.group(1), int(m.group(2)), m.group(3)
    if block == "decoder.layers":
        layer = chunk.decoder.layers[idx]
        index = layer.layer_number - 1
        prefix = f"decoder.layers.{index}."
    else:
        # megatron-core 0.19 renamed the MTP layer's ``transformer_layer`` to
        # ``mtp_model_layer``; canonical names keep the first spelling.
        mtp_layer = chunk.mtp.layers[idx]
        slot = "transformer_layer" if hasattr(mtp_layer, "transformer_layer") else "mtp_model_layer"
        layer = getattr(mtp_layer, slot)
        prefix = f"mtp.layers.{idx}."
        if not suffix.startswith(slot + "."):
            return prefix + suffix
        suffix = suffix[len(slot) + 1 :]
        prefix += "transformer_layer."
    suffix = _TE_ALIASES.get(suffix, suffix)
    g = _TE_GROUPED_RE.match(suffix) or _LOCAL_EXPERT_RE.match(suffix)
    if g:
        if _TE_GROUPED_RE.match(suffix):
            name, local_e = f"{g.group(1)}.weight", int(g.group(2))
        else:
            local_e, name = int(g.group(1)), g.group(2)
        expert = ep_rank * _num_local_experts(layer) + local_e
        suffix = f"mlp.experts.{expert}.{name}"
    return prefix + suffix


def local_tensors(chunks: list) -> Iterator[tuple[Any, str, torch.Tensor, str]]:
    """(chunk, local name, tensor, canonical name) of every weight and expert bias here."""
    ep_rank = _Parallel.current().ep_rank
    for chunk in chunks:
        model = unwrap(chunk)
        seen: set[int] = set()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor is None or not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
                continue
            canonical = canonical_name(name, model, ep_rank)
            if canonical is None:
                continue
            seen.add(id(tensor))
            yield model, name, tensor, canonical


def _model_dims(cfg: Any) -> dict[str, int]:
    m = cfg.model
    return {"heads": m.num_attention_heads, "groups": m.num_query_groups, "head_dim": m.kv_channels}


def _read_local(reader: HFReader, mapped: Mapped, par: _Parallel, dims: dict) -> torch.Tensor:
    """Read and transform the HF tensors of one megatron tensor, for this rank's shard only."""
    size, rank = (par.etp, par.etp_rank) if mapped.expert else (par.tp, par.tp_rank)
    kind, keys = mapped.rule.kind, mapped.hf_keys
    if kind == REPLICATED:
        return reader.get(keys[0])
    if kind == COLUMN:
        rows = reader.shape(keys[0])[0]
        return reader.get(keys[0], rows=_split(rows, size, rank, keys[0]))
    if kind == ROW:
        cols = reader.shape(keys[0])[1]
        return reader.get(keys[0], cols=_split(cols, size, rank, keys[0]))
    if kind == GLU:
        parts = []
        for key in keys:
            parts.append(reader.get(key, rows=_split(reader.shape(key)[0], size, rank, key)))
        return torch.cat(parts, dim=0)
    if kind == QKV:
        heads, groups, d = dims["heads"], dims["groups"], dims["head_dim"]
        key = keys[0]
        expected = (heads + 2 * groups) * d
        if reader.shape(key)[0] != expected:
            raise ValueError(
                f"{key} has {reader.shape(key)[0]} rows, expected (heads + 2 x kv_heads) x "
                f"head_dim = {expected}"
            )
        gs = _split(groups, size, rank, f"{key} (key/value groups)")
        per = heads // groups
        q = reader.get(key, rows=slice(gs.start * per * d, gs.stop * per * d))
        k = reader.get(key, rows=slice((heads + gs.start) * d, (heads + gs.stop) * d))
        v = reader.get(
            key, rows=slice((heads + groups + gs.start) * d, (heads + groups + gs.stop) * d)
        )
        n = gs.stop - gs.start
        hidden = q.shape[-1]
        return torch.cat(
            [q.reshape(n, per * d, hidden), k.reshape(n, d, hidden), v.reshape(n, d, hidden)], 1
        ).reshape(-1, hidden)
    raise AssertionError(kind)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, mininterval=1.0)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _all_gather_objects(obj: Any) -> list:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_hf_into_model(
    hf_dir: str | os.PathLike, chunks: list, cfg: Any, *, init_missing_mtp: bool | None = None
) -> None:
    """Load an HF BailingMoeV2 checkpoint into built megatron model chunks, in place.

    Works at any layout (TP/PP/VPP/EP/ETP, sequence parallel): each rank reads only the
    tensors, or slices, its own parameters need. Every local parameter and expert bias is
    assigned exactly once. Collective at the end (every rank calls it): the keys read on all
    ranks together must be the whole checkpoint.

    Args:
        hf_dir: HF checkpoint directory (config.json, safetensors, optional index).
        chunks: the list ``build_model(cfg)`` returns, or DDP-wrapped chunks.
        cfg: the job config the chunks were built from.
        init_missing_mtp: for a checkpoint without MTP layers and a model with them, load
            every other tensor and leave the MTP layers as built (their fresh
            initialisation: norms at one, ``eh_proj`` and the transformer layer from the
            model's init). Defaults to ``cfg.checkpoint.hf_init_missing_mtp``.

    Raises:
        ConfigError: config.json does not match ``cfg.model``.
        KeyError: tensors missing from or unexpected in the checkpoint (named).
        ValueError: a tensor's shape does not match its parameter.
    """
    if init_missing_mtp is None:
        init_missing_mtp = bool(getattr(cfg.checkpoint, "hf_init_missing_mtp", False))
    hf_config = read_hf_config(hf_dir)
    check_hf_config(hf_config, cfg.model, init_missing_mtp=init_missing_mtp)
    fresh_mtp = init_missing_mtp and hf_lacks_mtp(hf_config, cfg.model)
    reader = HFReader(hf_dir)
    expected = set(expected_hf_keys(cfg.model, with_mtp=not fresh_mtp))
    present = set(reader.keys())
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise KeyError(
            f"{hf_dir} does not hold exactly the tensors of model {cfg.model.name}: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
            f"({len(unexpected)})"
        )
    par = _Parallel.current()
    dims = _model_dims(cfg)
    items = list(local_tensors(chunks))
    if fresh_mtp:
        items = [item for item in items if not item[3].startswith("mtp.")]
        if _is_rank0():
            logger.info(
                "%s has no MTP layer: model.mtp_num_layers=%d keeps its fresh initialisation",
                hf_dir,
                cfg.model.mtp_num_layers,
            )
    errors: list[str] = []
    used: set[str] = set()
    assigned: dict[tuple[int, str], str] = {}
    with torch.no_grad(), _progress(len(items), "loading HF tensors", _is_rank0()) as bar:
        for model, name, tensor, canonical in items:
            bar.update(1)
            try:
                mapped = map_canonical(canonical, cfg.model.num_layers)
            except KeyError:
                errors.append(f"megatron tensor {name} ({canonical}) has no HF mapping")
                continue
            key = (id(model), canonical)
            if key in assigned:
                errors.append(f"{name} and {assigned[key]} both map to {canonical}")
                continue
            assigned[key] = name
            value = _read_local(reader, mapped, par, dims)
            if tuple(value.shape) != tuple(tensor.shape):
                errors.append(
                    f"{name}: HF {', '.join(mapped.hf_keys)} gives shape {tuple(value.shape)} on "
                    f"this rank, the parameter has {tuple(tensor.shape)}"
                )
                continue
            tensor.data.copy_(value)
            used.update(mapped.hf_keys)
    reader.close()
    everything = _all_gather_objects((errors, sorted(used)))
    all_errors = [e for errs, _ in everything for e in errs]
    if all_errors:
        raise ValueError("loading the HF checkpoint failed:\n" + "\n".join(all_errors[:20]))
    read = set().union(*(set(u) for _, u in everything))
    if read != expected:
        raise KeyError(f"HF tensors no rank loaded: {sorted(expected - read)[:10]}")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _gather(tensor: torch.Tensor, expert: bool) -> list[torch.Tensor]:
    """All tensor-parallel shards of ``tensor`` (expert-TP group for routed experts)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = (
        ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    )
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return [tensor.detach()]
    local = tensor.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=group)
    return shards


def unshard_to_hf(
    rule: Rule, shards: list[torch.Tensor], hf_keys: tuple[str, ...], dims: dict
) -> dict[str, torch.Tensor]:
    """HF tensors from the tensor-parallel shards of one megatron tensor (inverse of
    the loader's per-rank read)."""
    kind = rule.kind
    if kind == REPLICATED:
        return {hf_keys[0]: shards[0]}
    if kind == COLUMN:
        return {hf_keys[0]: torch.cat(shards, 0)}
    if kind == ROW:
        return {hf_keys[0]: torch.cat(shards, 1)}
    if kind == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {
            hf_keys[0]: torch.cat([h[0] for h in halves], 0),
            hf_keys[1]: torch.cat([h[1] for h in halves], 0),
        }
    if kind == QKV:
        full = torch.cat(shards, 0)
        return {hf_keys[0]: qkv_mcore_to_hf(full, dims["heads"], dims["groups"], dims["head_dim"])}
    raise AssertionError(kind)


def _owns(model: Any, canonical: str, mapped: Mapped, par: _Parallel) -> bool:
    """Whether this rank's group writes the tensor (one writer per tensor in the world)."""
    if canonical == "embedding.word_embeddings.weight" and not getattr(model, "pre_process", True):
        return False  # MTP's tied copy on a later stage; the first stage's is written
    return (par.expert_dp_rank if mapped.expert else par.dp_rank) == 0


def _to_export(key: str, tensor: torch.Tensor, rule: Rule, dtype: str) -> dict[str, torch.Tensor]:
    if key.endswith("expert_bias"):
        return {key: tensor.float().contiguous()}
    if dtype == "fp8" and rule.fp8:
        from ling_pretrain.fp8.quantize import quantize_blockwise

        q, scale_inv = quantize_blockwise(tensor, FP8_BLOCK, "e4m3", name=key)
        return {key: q.contiguous(), key + SCALE_INV_SUFFIX: scale_inv.float().contiguous()}
    return {key: tensor.to(EXPORT_DTYPES[dtype]).contiguous()}


class _ShardWriter:
    """Accumulates tensors and writes a safetensors file every ``max_bytes``."""

    def __init__(self, out: Path, rank: int, max_bytes: int):
        self.out, self.rank, self.max_bytes = out, rank, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-rank{self.rank:05d}-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        logger.info("wrote %s (%d tensors, %.1f MB)", name, len(self.pending), self.size / 1e6)
        self.files.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0


def _copy_template(template_dir: Path, out: Path) -> list[str]:
    copied = []
    for pattern in TEMPLATE_PATTERNS:
        for src in sorted(template_dir.glob(pattern)):
            if src.is_file() and not (out / src.name).exists():
                shutil.copy2(src, out / src.name)
                copied.append(src.name)
    return copied


def _fp8_quantization_config(model_cfg: Any) -> dict:
    not_converted = ["lm_head"]
    for j in range(model_cfg.mtp_num_layers):
        not_converted.append(f"model.layers.{model_cfg.num_layers + j}.eh_proj")
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": list(FP8_BLOCK),
        "activation_scheme": "dynamic",
        "modules_to_not_convert": not_converted,
    }


def export_hf(
    chunks: list,
    cfg: Any,
    out_dir: str | os.PathLike,
    dtype: str = "bf16",
    template_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the model as an HF BailingMoeV2 checkpoint. Collective: every rank calls it.

    Tensor-parallel shards are gathered; the data-parallel rank 0 of each pipeline stage and
    expert rank writes its own tensors into shard files of at most ``max_shard_bytes`` (one
    tensor larger than that gets a file of its own); rank 0 then names the files
    ``model-0000i-of-0000n.safetensors`` and writes ``model.safetensors.index.json`` and
    ``config.json``. Everything goes to ``<out_dir>.partial``, renamed to ``out_dir`` at the
    end (an existing ``out_dir`` is replaced only then).

    Args:
        chunks: model chunks (``build_model`` output or DDP-wrapped).
        cfg: the job config the chunks were built from.
        out_dir: the HF directory to write.
        dtype: ``bf16``, ``fp32`` or ``fp8`` (E4M3 linear weights with 128x128 block scales;
            the rest bf16). The expert bias is fp32 in every case.
        template_dir: an HF directory whose tokenizer, generation config and modeling code
            are copied (files already written are kept).
        max_shard_bytes: size at which a rank starts a new safetensors file.

    Returns:
        ``out_dir``.
    """
    import torch.distributed as dist

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
    template = Path(template_dir) if template_dir else None
    if template is not None and not template.is_dir():
        raise FileNotFoundError(f"template directory {template} does not exist")
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    if distributed:
        dist.barrier()

    par = _Parallel.current()
    dims = _model_dims(cfg)
    writer = _ShardWriter(partial, rank, max_shard_bytes)
    items = list(local_tensors(chunks))
    errors: list[str] = []
    with torch.no_grad(), _progress(len(items), "exporting tensors", rank == 0) as bar:
        for model, name, tensor, canonical in items:
            bar.update(1)
            try:
                mapped = map_canonical(canonical, cfg.model.num_layers)
            except KeyError:
                errors.append(f"megatron tensor {name} ({canonical}) has no HF mapping")
                continue
            if not _owns(model, canonical, mapped, par):
                continue
            split = mapped.rule.kind != REPLICATED
            shards = _gather(tensor, mapped.expert) if split else [tensor.detach()]
            if (par.etp_rank if mapped.expert else par.tp_rank) != 0:
                continue
            hf = unshard_to_hf(mapped.rule, shards, mapped.hf_keys, dims)
            for key, value in hf.items():
                writer.add(_to_export(key, value, mapped.rule, dtype))
    writer.flush()

    everything = _all_gather_objects((errors, writer.files, writer.weight_map))
    if rank == 0:
        problems = [e for errs, _, _ in everything for e in errs]
        weight_map: dict[str, str] = {}
        for _, _, wm in everything:
            for key, file in wm.items():
                if key in weight_map:
                    problems.append(f"{key} was written twice ({weight_map[key]}, {file})")
                weight_map[key] = file
        written = {k for k in weight_map if not k.endswith("_scale_inv")}
        expected = set(expected_hf_keys(cfg.model))
        if written != expected:
            problems.append(
                f"export incomplete: missing {sorted(expected - written)[:10]}, "
                f"unexpected {sorted(written - expected)[:10]}"
            )
        status = "\n".join(problems)
    else:
        status = ""
    status = _all_gather_objects(status)[0]
    if status:
        raise RuntimeError(f"HF export to {out} failed:\n{status}")

    if rank == 0:
        files = [f for _, fs, _ in everything for f in fs]
        n = len(files)
        rename = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
        for old, new in rename.items():
            os.replace(partial / old, partial / new)
        total = 0
        for new in rename.values():
            total += _safetensors_data_bytes(partial / new)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: rename[v] for k, v in sorted(weight_map.items())},
        }
        atomic_write_json(partial / INDEX_FILE, index)
        config = hf_config_from_model(
            cfg.model, torch_dtype="float32" if dtype == "fp32" else "bfloat16"
        )
        if dtype == "fp8":
            config["quantization_config"] = _fp8_quantization_config(cfg.model)
        atomic_write_json(partial / CONFIG_FILE, config)
        if template is not None:
            copied = _copy_template(template, partial)
            logger.info("copied from %s: %s", template, ", ".join(copied) or "nothing")
        old = out.with_name(out.name + ".old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(partial, out)
        if old.exists():
            shutil.rmtree(old)
        logger.info("wrote %s (%d files, %.1f MB)", out, n, total / 1e6)
    if distributed:
        dist.barrier()
    return out


def _safetensors_data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header
