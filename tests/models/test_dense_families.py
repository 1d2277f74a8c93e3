"""The dense families (llama, qwen3): registry, published parameter counts, config.json in both
spellings and back, and the rules that refuse what the model does not have."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB
from ling_pretrain.models.dense_hf import LLAMA3_FIXED_ROPE
from ling_pretrain.models.registry import families, family_for_hf_config, get_family
from tests.conftest import REPO, subprocess_env
from tests.models.hf_dense import LLAMA31_8B, PUBLISHED, QWEN3_8B

TINY = ("llama_tiny", "qwen3_tiny")

H100 = Hardware("cuda", 80 * GIB, has_transformer_engine=True, compute_capability=(9, 0))


def _model(preset: str, *overrides: str):
    return compose([f"+model={preset}", *overrides]).model


def _transformers_count(hf: dict) -> int:
    """Parameters of transformers' own model for ``hf`` (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_registry_finds_the_dense_families():
    assert {"ling", "llama", "qwen3"} <= set(families())
    assert family_for_hf_config(LLAMA31_8B).name == "llama"
    assert family_for_hf_config(QWEN3_8B).name == "qwen3"
    assert get_family(_model("llama_tiny")).name == "llama"


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_parameter_counts(preset):
    hf, published = PUBLISHED[preset]
    m = _model(preset)
    counts = get_family(m).count_parameters(m)
    assert counts.total_params == counts.active_params == published
    assert counts.embedding_params == 2 * m.vocab_size * m.hidden_size
    assert counts.expert_params == counts.mtp_params == counts.buffers == 0
    assert _transformers_count(hf) == published


@pytest.mark.parametrize("preset", TINY)
def test_tiny_counts_equal_transformers(preset):
    m = _model(preset)
    hf = get_family(m).hf.config_json(m)
    assert get_family(m).count_parameters(m).total_params == _transformers_count(hf)


def test_model_info_prints_the_counts():
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "model_info.py"), "+model=llama31_8b"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "llama31_8b" and out["total_params"] == 8_030_261_248


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_config_json_gives_the_preset(preset):
    """Every architecture field read from the published config.json equals the preset's."""
    hf, _ = PUBLISHED[preset]
    m = _model(preset)
    adapter = get_family(m).hf
    fields = adapter.model_fields(hf)
    assert fields, preset
    for key, value in fields.items():
        assert m[key] == value, key
    adapter.check_config(hf, m)


def _rope_parameters_spelling(hf: dict) -> dict:
    """The same config.json as transformers 5 writes it (``rope_parameters``, ``dtype``)."""
    out = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    out["rope_parameters"] = {
        "rope_theta": float(hf["rope_theta"]),
        **(hf["rope_scaling"] or {"rope_type": "default"}),
    }
    out["dtype"] = hf["torch_dtype"]
    return out


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_both_rope_spellings_read_the_same(preset):
    hf, _ = PUBLISHED[preset]
    adapter = get_family(_model(preset)).hf
    assert adapter.model_fields(_rope_parameters_spelling(hf)) == adapter.model_fields(hf)


@pytest.mark.parametrize("preset", [*TINY, *PUBLISHED])
def test_exported_config_json_reads_back_and_loads_in_transformers(preset):
    from transformers import AutoConfig

    m = _model(preset)
    adapter = get_family(m).hf
    written = adapter.config_json(m, torch_dtype="float32")
    for key, value in adapter.model_fields(written).items():
        assert m[key] == value, key
    config = AutoConfig.for_model(**written)
    rope = config.rope_parameters
    assert config.model_type == adapter.model_types[0]
    assert rope["rope_theta"] == m.rotary_base
    assert config.head_dim == m.kv_channels and config.rms_norm_eps == m.layernorm_epsilon
    assert config.num_key_value_heads == m.num_query_groups
    if m.rope_scaling:
        assert rope["rope_type"] == "llama3" and rope["factor"] == m.rope_scaling_factor
        assert {k: rope[k] for k in LLAMA3_FIXED_ROPE} == LLAMA3_FIXED_ROPE
    else:
        assert rope["rope_type"] == "default"


def test_published_token_ids_are_written_for_the_published_vocabularies():
    llama = get_family("llama").hf.config_json(_model("llama31_8b"))
    qwen = get_family("qwen3").hf.config_json(_model("qwen3_8b"))
    assert (llama["bos_token_id"], llama["eos_token_id"]) == (128000, 128001)
    assert (qwen["bos_token_id"], qwen["eos_token_id"]) == (151643, 151643)
    assert get_family("llama").hf.config_json(_model("llama_tiny"))["eos_token_id"] == 0


def test_megatron_core_fixes_the_llama3_parameters_we_require():
    """If a megatron-core release changes its hard-coded llama3 values, this fails."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    assert {k: params[k].default for k in LLAMA3_FIXED_ROPE} == LLAMA3_FIXED_ROPE


@pytest.mark.parametrize(
    "preset,change,message",
    [
        ("llama31_8b", {"tie_word_embeddings": True}, "tied input/output embeddings"),
        ("llama31_8b", {"attention_bias": True}, "attention (QKV and output) biases"),
        ("llama31_8b", {"mlp_bias": True}, "MLP biases"),
        ("llama31_8b", {"hidden_act": "gelu"}, "the MLP activation"),
        ("llama31_8b", {"partial_rotary_factor": 0.5}, "partial RoPE"),
        (
            "llama31_8b",
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope_type='yarn' is not supported",
        ),
        (
            "llama31_8b",
            {"rope_scaling": {**LLAMA31_8B["rope_scaling"], "low_freq_factor": 2.0}},
            "megatron-core computes llama3 RoPE scaling with low_freq_factor=1.0",
        ),
        ("llama31_8b", {"model_type": "mistral"}, "is not a LlamaForCausalLM checkpoint"),
        ("qwen3_8b", {"use_sliding_window": True}, "sliding-window attention"),
        (
            "qwen3_8b",
            {"layer_types": ["sliding_attention"] * 36},
            "only full_attention layers are built",
        ),
        (
            "qwen3_8b",
            {"rope_scaling": LLAMA31_8B["rope_scaling"]},
            "rope_type='llama3' is not supported for Qwen3ForCausalLM",
        ),
    ],
)
def test_unsupported_hf_features_are_refused(preset, change, message):
    hf, _ = PUBLISHED[preset]
    adapter = get_family(_model(preset)).hf
    with pytest.raises(ConfigError, match="unsupported Hugging Face config") as err:
        adapter.model_fields({**hf, **change})
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="does not match model"):
        adapter.check_config({**hf, **change}, _model(preset))


def test_a_config_json_of_another_size_names_the_field():
    hf = {**LLAMA31_8B, "num_hidden_layers": 16}
    with pytest.raises(ConfigError) as err:
        get_family("llama").hf.check_config(hf, _model("llama31_8b"))
    assert "num_hidden_layers=16 but model.num_layers=32" in str(err.value)


def test_the_table_holds_qk_norm_only_for_qwen3():
    llama = get_family("llama").hf.expected_keys(_model("llama_tiny"))
    qwen = get_family("qwen3").hf.expected_keys(_model("qwen3_tiny"))
    layer = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    whole = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert sorted(llama) == sorted(
        whole + [f"model.layers.{i}.{k}" for i in range(4) for k in layer]
    )
    norms = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    assert sorted(qwen) == sorted(
        whole + [f"model.layers.{i}.{k}" for i in range(4) for k in layer + norms]
    )


def _errors(preset: str, overrides: list[str], world: int = 1) -> str:
    cfg = compose([f"+model={preset}", "data=mock", "run.check_memory=false", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    return str(err.value)


@pytest.mark.parametrize(
    "preset,overrides,message",
    [
        (
            "llama_tiny",
            ["model.num_moe_experts=8", "model.moe_ffn_hidden_size=64"],
            "model.family=llama is a dense model: model.num_moe_experts, "
            "model.moe_ffn_hidden_size must be null",
        ),
        ("llama_tiny", ["model.mtp_num_layers=1"], "model.family=llama has no MTP layers"),
        ("llama_tiny", ["model.qk_layernorm=true"], "model.family=llama has no QK-norm"),
        ("qwen3_tiny", ["model.qk_layernorm=false"], "model.family=qwen3 has QK-norm"),
        ("qwen3_tiny", ["model.rope_scaling=true"], "which model.family=qwen3 does not use"),
        ("qwen3_tiny", ["model.rotary_percent=0.5"], "set model.rotary_percent=1.0"),
        (
            "llama_tiny",
            ["model.rope_scaling_factor=0"],
            "model.rope_scaling_factor=0.0 must be > 0",
        ),
        (
            "llama_tiny",
            ["parallel.expert_model_parallel_size=2"],
            "model llama_tiny has no routed experts",
        ),
    ],
)
def test_dense_rules(preset, overrides, message):
    assert message in _errors(preset, overrides, world=2)


@pytest.mark.parametrize("preset", TINY)
def test_tensor_parallel_without_sequence_parallel_validates(preset):
    """Dense models need no sequence parallelism under TP (MoE's rule does not apply)."""
    cfg = compose([f"+model={preset}", "data=mock", "parallel.tensor_model_parallel_size=2"])
    assert validate(cfg, 2).tp == 2


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_8b_presets_validate_on_eight_h100(preset):
    cfg = compose([f"+model={preset}", "trainer.params_dtype=bf16", "trainer.micro_batch_size=1"])
    assert validate(cfg, 8, H100).dp == 8
    one = compose([f"+model={preset}", "trainer.params_dtype=bf16", "trainer.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=f"model {preset} needs at least"):
        validate(one, 1, H100)  # ~120 GiB of model states on one 80 GB GPU
