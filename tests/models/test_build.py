"""The megatron-core model the builder makes is Ling 2.0 (in-process, world of one, CPU)."""

from __future__ import annotations

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.models.norm import RMSNorm


@pytest.fixture(scope="module")
def build():
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    cfg = compose(["+model=ling_tiny", "data=mock", "trainer.params_dtype=bf16"])
    init_distributed(cfg)
    from ling_pretrain.models.build import build_model

    yield lambda c=cfg: build_model(c)
    destroy_distributed()


def test_structure(build):
    (model,) = build()
    names = dict(model.named_parameters())
    assert "embedding.word_embeddings.weight" in names and "output_layer.weight" in names
    assert names["embedding.word_embeddings.weight"] is not names["output_layer.weight"]
    assert names["embedding.word_embeddings.weight"].shape == (8192, 128)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names  # dense first layer
    assert "decoder.layers.1.mlp.router.weight" in names
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in names
    assert "mtp.layers.0.eh_proj.weight" in names and "mtp.layers.0.enorm.weight" in names
    qk_norm = names["decoder.layers.0.self_attention.q_layernorm.weight"]
    assert qk_norm.shape == (32,)  # one head_dim-sized weight shared by all heads
    assert not any(n.endswith(".bias") for n in names), "Ling has no biases"


def test_every_norm_is_rmsnorm(build):
    (model,) = build()
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, RMSNorm) for m in norms), {type(m).__name__ for m in norms}


def test_expert_bias_stays_fp32_under_bf16(build):
    (model,) = build()
    biases = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}
    assert len(biases) == 3 + 1  # 3 MoE decoder layers + the MTP layer
    assert all(b.dtype == torch.float32 for b in biases.values())
    assert next(model.parameters()).dtype == torch.bfloat16


def test_partial_rope(build):
    (model,) = build()
    rope = model.rotary_pos_emb
    assert rope.inv_freq.numel() * 2 == 16  # rotary_percent 0.5 of head_dim 32


def test_rmsnorm_matches_hf_formula():
    class Cfg:
        params_dtype, sequence_parallel, use_cpu_initialization = torch.bfloat16, False, True

    norm = RMSNorm(Cfg(), 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 8).to(torch.bfloat16)
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        torch.bfloat16
    )
    assert torch.equal(norm(x), expected)
