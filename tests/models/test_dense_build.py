"""The megatron-core models the builder makes for the dense families (in-process, world of
one, CPU): their tensors, their counts and their RoPE frequencies against HF transformers'."""

from __future__ import annotations

import math

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.models.norm import RMSNorm
from ling_pretrain.models.registry import get_family
from tests.models.hf_dense import hf_config


@pytest.fixture(scope="module")
def build():
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(compose(["+model=llama_tiny", "data=mock", "trainer.params_dtype=fp32"]))
    from ling_pretrain.models.build import build_model

    built: dict = {}

    def get(preset: str):
        if preset not in built:
            cfg = compose([f"+model={preset}", "data=mock", "trainer.params_dtype=fp32"])
            (built[preset],) = build_model(cfg)
        return built[preset], compose([f"+model={preset}"]).model

    yield get
    destroy_distributed()


def _hf_inv_freq(preset: str) -> torch.Tensor:
    """The inverse RoPE frequencies of transformers' own rotary module for the preset."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = hf_config(preset)
    rotary = {"llama": LlamaRotaryEmbedding, "qwen3": Qwen3RotaryEmbedding}[config.model_type]
    module = rotary(config)
    assert module.attention_scaling == 1.0
    return module.inv_freq.float()


@pytest.mark.parametrize("preset", ["llama_tiny", "qwen3_tiny"])
def test_tensors_and_count(build, preset):
    model, m = build(preset)
    names = {n: p.shape for n, p in model.named_parameters()}
    q = m.num_attention_heads * m.kv_channels
    qkv = q + 2 * m.num_query_groups * m.kv_channels
    layer = "decoder.layers.0."
    assert names[layer + "self_attention.linear_qkv.weight"] == (qkv, m.hidden_size)
    assert names[layer + "self_attention.linear_proj.weight"] == (m.hidden_size, q)
    assert names[layer + "mlp.linear_fc1.weight"] == (2 * m.ffn_hidden_size, m.hidden_size)
    assert names[layer + "mlp.linear_fc2.weight"] == (m.hidden_size, m.ffn_hidden_size)
    assert names["output_layer.weight"] == names["embedding.word_embeddings.weight"]
    qk_norm = {n for n in names if "q_layernorm" in n or "k_layernorm" in n}
    if m.qk_layernorm:
        assert len(qk_norm) == 2 * m.num_layers
        assert names[layer + "self_attention.q_layernorm.weight"] == (m.kv_channels,)
    else:
        assert not qk_norm
    assert not any(n.endswith(".bias") for n in names), "dense models have no biases"
    assert not any("mtp" in n or "router" in n or "experts" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == (
        get_family(m).count_parameters(m).total_params
    )


@pytest.mark.parametrize("preset", ["llama_tiny", "qwen3_tiny"])
def test_every_norm_is_rmsnorm_with_the_models_epsilon(build, preset):
    model, m = build(preset)
    norms = [mod for mod in model.modules() if "Norm" in type(mod).__name__]
    assert norms and all(isinstance(n, RMSNorm) for n in norms)
    assert {n.eps for n in norms} == {m.layernorm_epsilon}
    expected = m.num_layers * (4 if m.qk_layernorm else 2) + 1
    assert len(norms) == expected


@pytest.mark.parametrize("preset", ["llama_tiny", "qwen3_tiny"])
def test_rope_frequencies_equal_transformers(build, preset):
    """megatron-core's ``rope_scaling`` is HF's ``rope_type: llama3``, bit for bit."""
    model, m = build(preset)
    ours = model.rotary_pos_emb.inv_freq
    assert ours.shape == (m.kv_channels // 2,)
    assert torch.equal(ours, _hf_inv_freq(preset))


def test_llama_tiny_exercises_every_band_of_llama3_scaling(build):
    """Its frequencies fall in all three bands: kept (wavelength < 2048), interpolated and
    divided by the factor (> 8192), so the parity tests cover the whole formula."""
    model, m = build("llama_tiny")
    dim = m.kv_channels
    plain = 1.0 / (m.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / plain
    kept, divided = wavelen < 2048, wavelen > 8192
    middle = ~kept & ~divided
    assert kept.any() and divided.any() and middle.any()
    ours = model.rotary_pos_emb.inv_freq
    assert torch.equal(ours[kept], plain[kept])
    assert torch.equal(ours[divided], plain[divided] / 8)
    assert ((ours[middle] < plain[middle]) & (ours[middle] > plain[middle] / 8)).all()


def test_llama31_8b_rope_frequencies_equal_transformers():
    """The full-size head (128 channels, theta 500000): megatron-core's table is HF's."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    m = compose(["+model=llama31_8b"]).model
    kwargs = get_family(m).gpt_model_kwargs(m)
    rope = RotaryEmbedding(
        m.kv_channels,
        kwargs["rotary_percent"],
        rotary_base=kwargs["rotary_base"],
        rope_scaling=kwargs["rope_scaling"],
        rope_scaling_factor=kwargs["rope_scaling_factor"],
        use_cpu_initialization=True,
    )
    assert torch.equal(rope.inv_freq, _hf_inv_freq("llama31_8b"))
