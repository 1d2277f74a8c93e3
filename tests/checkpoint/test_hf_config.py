"""config.json <-> ModelConfig, the QKV permutation and the key table (no process group)."""

from __future__ import annotations

import pytest
import torch

from ling_pretrain.checkpoint.hf import exporter, naming, rules
from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.models.registry import get_family

LING = get_family("ling").hf

PRESETS = ["ling_tiny", "ling_mini", "ling_flash", "ling_1t"]


@pytest.mark.parametrize("preset", PRESETS)
def test_config_json_round_trip(preset):
    m = compose([f"+model={preset}"]).model
    config = LING.config_json(m)
    assert config["model_type"] == "bailing_moe_v2"
    assert config["architectures"] == ["BailingMoeV2ForCausalLM"]
    back = LING.model_fields(config)
    for field, value in back.items():
        assert getattr(m, field) == pytest.approx(value), field
    LING.check_config(config, m)


def test_ling_mini_config_values():
    config = LING.config_json(compose(["+model=ling_mini"]).model)
    assert config["eos_token_id"] == config["pad_token_id"] == 156892
    assert config["num_shared_experts"] == 1 and config["moe_intermediate_size"] == 512
    assert config["partial_rotary_factor"] == 0.5 and config["rotary_dim"] == 64
    assert config["num_nextn_predict_layers"] == 1 and config["tie_word_embeddings"] is False
    tiny = LING.config_json(compose(["+model=ling_tiny"]).model)
    assert tiny["eos_token_id"] == 0  # the built-in tokenizer's <|endoftext|>


def test_both_rotary_spellings():
    base = LING.config_json(compose(["+model=ling_1t"]).model)
    base.pop("rotary_dim")
    factor = dict(base, partial_rotary_factor=0.5)
    dim = {k: v for k, v in base.items() if k != "partial_rotary_factor"} | {"rotary_dim": 64}
    assert LING.model_fields(factor)["rotary_percent"] == 0.5
    assert LING.model_fields(dim)["rotary_percent"] == 0.5
    quarter = dict(dim, rotary_dim=32)
    assert LING.model_fields(quarter)["rotary_percent"] == 0.25
    m = compose(["+model=ling_1t"]).model
    LING.check_config(dim, m)
    with pytest.raises(
        ConfigError, match=r"rotary_dim=32 \(of head_dim=128\).*model.rotary_percent=0.25"
    ):
        LING.check_config(quarter, m)


def test_shared_expert_and_mtp_derivation():
    config = LING.config_json(compose(["+model=ling_mini"]).model)
    config.update(num_shared_experts=2)
    config.pop("num_nextn_predict_layers")
    out = LING.model_fields(config)
    assert out["moe_shared_expert_intermediate_size"] == 1024
    assert out["mtp_num_layers"] == 0


def test_mismatch_names_every_field_and_fix():
    m = compose(["+model=ling_mini"]).model
    config = LING.config_json(m)
    config.update(num_experts=128, rope_theta=10000.0)
    with pytest.raises(ConfigError) as err:
        LING.check_config(config, m)
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "num_experts=128 but model.num_moe_experts=256" in text
    assert "add model.num_moe_experts=128" in text
    assert "rope_theta=10000.0 but model.rotary_base=600000" in text


def test_unsupported_features_refused():
    config = LING.config_json(compose(["+model=ling_mini"]).model)
    for key, value in [("tie_word_embeddings", True), ("use_qkv_bias", True)]:
        with pytest.raises(ConfigError, match=key):
            LING.model_fields(dict(config, **{key: value}))
    with pytest.raises(ConfigError, match="rope_scaling"):
        LING.model_fields(dict(config, rope_scaling={"type": "yarn", "factor": 4.0}))


def test_qkv_permutation_is_megatrons_group_interleave():
    heads, groups, d, hidden = 4, 2, 3, 5
    # Label each row by (block, head): Q heads 0..3, K heads 0..1, V heads 0..1.
    labels = [("q", h) for h in range(heads)] + [("k", g) for g in range(groups)]
    labels += [("v", g) for g in range(groups)]
    w = torch.stack([torch.full((d, hidden), float(i)) for i in range(len(labels))]).reshape(
        -1, hidden
    )
    out = rules.qkv_hf_to_mcore(w, heads, groups, d)
    order = [labels[int(out[r * d, 0])] for r in range(out.shape[0] // d)]
    assert order == [("q", 0), ("q", 1), ("k", 0), ("v", 0), ("q", 2), ("q", 3), ("k", 1), ("v", 1)]
    assert torch.equal(rules.qkv_mcore_to_hf(out, heads, groups, d), w)


def test_glu_unshard_deinterleaves_tp_shards():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    shards = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]  # TP2 [gate; up]
    rule = rules.Rule("x", ("g", "u"), rules.GLU)
    out = exporter.unshard_to_hf(rule, shards, ("g", "u"), {})
    assert torch.equal(out["g"], gate) and torch.equal(out["u"], up)


def test_expected_keys_cover_dense_moe_and_mtp():
    m = compose(["+model=ling_tiny"]).model
    keys = set(LING.expected_keys(m))
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense first layer
    assert "model.layers.0.mlp.gate.weight" not in keys
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.3.mlp.gate.expert_bias" in keys
    mtp = 4  # num_hidden_layers
    for name in ("enorm", "hnorm", "eh_proj", "final_layernorm"):
        assert f"model.layers.{mtp}.{name}.weight" in keys
    assert f"model.layers.{mtp}.attention.query_key_value.weight" in keys
    assert f"model.layers.{mtp}.mlp.gate.expert_bias" in keys
    assert "model.layers.5.input_layernorm.weight" not in keys
    per_moe_layer = 4 + 2 + 2 + 8 * 3 + 3  # norms, attention, gate + bias, experts, shared
    assert len(keys) == 3 + (4 + 2 + 3) + 3 * per_moe_layer + (4 + per_moe_layer)


def test_layout_free_names_including_transformer_engine_spellings():
    """Local layer/expert numbers become global ones and TE's fused names the local spec's
    (the TE layers themselves only exist on GPUs; this checks the name logic)."""
    from types import SimpleNamespace as NS

    layer = NS(layer_number=3, mlp=NS(experts=NS(num_local_experts=4)))
    chunk = NS(decoder=NS(layers=[layer]), mtp=NS(layers=[NS(transformer_layer=layer)]))
    cases = {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (
            "decoder.layers.2.input_layernorm.weight",
            ("model.layers.2.input_layernorm.weight",),
        ),
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": (
            "decoder.layers.2.pre_mlp_layernorm.weight",
            ("model.layers.2.post_attention_layernorm.weight",),
        ),
        "decoder.layers.0.mlp.experts.linear_fc2.weight3": (  # TE grouped GEMM, EP rank 1
            "decoder.layers.2.mlp.experts.7.linear_fc2.weight",
            ("model.layers.2.mlp.experts.7.down_proj.weight",),
        ),
        "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight": (
            "decoder.layers.2.mlp.experts.7.linear_fc1.weight",
            (
                "model.layers.2.mlp.experts.7.gate_proj.weight",
                "model.layers.2.mlp.experts.7.up_proj.weight",
            ),
        ),
        "mtp.layers.0.transformer_layer.self_attention.linear_qkv.layer_norm_weight": (
            "mtp.layers.0.transformer_layer.input_layernorm.weight",
            ("model.layers.4.input_layernorm.weight",),
        ),
        "mtp.layers.0.eh_proj.weight": (
            "mtp.layers.0.eh_proj.weight",
            ("model.layers.4.eh_proj.weight",),
        ),
    }
    for local, (canonical, keys) in cases.items():
        assert naming.canonical_name(local, chunk, ep_rank=1) == canonical
        assert LING.map_canonical(canonical, NS(num_layers=4)).hf_keys == keys
    assert (
        naming.canonical_name("decoder.layers.0.self_attention.linear_qkv._extra_state", chunk, 1)
        is None
    )
    with pytest.raises(KeyError):
        LING.map_canonical("decoder.layers.0.mlp.unknown.weight", NS(num_layers=4))
