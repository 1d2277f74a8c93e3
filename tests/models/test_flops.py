"""FLOPs per token (Megatron-LM's convention) against an independent count.

``torch.utils.flop_counter.FlopCounterMode`` counts every matrix multiplication the real
megatron-core model runs in one forward and backward pass. It sees exactly the convention's
GEMMs, less what the convention counts that is not a GEMM (Megatron-LM's ``3h`` MTP norm
term), plus what the convention leaves out: the router GEMM and the masked half of core
attention (megatron's local attention multiplies the whole ``s x s`` square).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ling_pretrain.config import CONF_DIR, compose
from ling_pretrain.models.flops import FMA, FWD_BWD, gpt_flops_per_token
from ling_pretrain.models.registry import get_family

SEQ, BATCH = 64, 2
BASE = ["data=mock", f"data.seq_length={SEQ}", "trainer.params_dtype=fp32"]

MODELS = {
    "ling_tiny": ["+model=ling_tiny"],
    # A Ling config with no MoE layer and no MTP is a dense GPT model.
    "ling_tiny_dense": [
        "+model=ling_tiny",
        "model.first_k_dense_replace=4",
        "model.mtp_num_layers=0",
    ],
    "llama_tiny": ["+model=llama_tiny"],
    "qwen3_tiny": ["+model=qwen3_tiny"],
}


@pytest.fixture(scope="module")
def counted():
    """Model name -> (its config, FLOPs flop_counter counted for one forward + backward)."""
    from ling_pretrain.models.build import build_model
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(compose([*MODELS["ling_tiny"], *BASE]))
    cache: dict = {}

    def count(name: str):
        if name not in cache:
            if not (CONF_DIR / "model" / f"{MODELS[name][0].split('=')[1]}.yaml").exists():
                pytest.skip(f"preset {MODELS[name][0]} is not in conf/model/")
            cfg = compose([*MODELS[name], *BASE])
            torch.manual_seed(0)
            (model,) = build_model(cfg)
            v = cfg.model.vocab_size
            tokens = torch.randint(0, v, (BATCH, SEQ))
            labels = torch.randint(0, v, (BATCH, SEQ))
            counter = FlopCounterMode(display=False)
            with counter:
                loss = model(
                    input_ids=tokens,
                    position_ids=torch.arange(SEQ).expand(BATCH, SEQ),
                    attention_mask=None,
                    labels=labels,
                    loss_mask=torch.ones(BATCH, SEQ),
                )
                loss.sum().backward()
            cache[name] = (cfg, counter.get_total_flops())
        return cache[name]

    yield count
    destroy_distributed()


@pytest.mark.parametrize("name", list(MODELS))
def test_formula_matches_flop_counter(counted, name):
    cfg, measured = counted(name)
    terms = get_family(cfg.model).flops(cfg.model, SEQ)
    mtp = cfg.model.mtp_num_layers
    not_gemm = FWD_BWD * FMA * mtp * 3 * cfg.model.hidden_size  # Megatron-LM's MTP norm term
    expected = terms.total - not_gemm + terms.router + terms.masked_core_attention
    assert measured == pytest.approx(expected * BATCH * SEQ, rel=1e-9), terms.as_dict()
    # The convention's terms are most of what runs (the rest is router and masked attention).
    assert terms.total * BATCH * SEQ < measured


def test_dense_and_moe_terms(counted):
    cfg, _ = counted("ling_tiny_dense")
    dense = get_family(cfg.model).flops(cfg.model, SEQ)
    assert dense.routed_experts == dense.shared_experts == dense.router == 0
    assert dense.mtp_projections == 0
    cfg, _ = counted("ling_tiny")
    moe = get_family(cfg.model).flops(cfg.model, SEQ)
    # 3 MoE decoder layers + the MTP layer, top-4 of 8 experts of width 64, hidden 128.
    assert moe.routed_experts == 6 * 4 * 3 * 128 * 64 * 4
    assert moe.router == 6 * 4 * 128 * 8
    assert moe.logits == 6 * 128 * 8192 * 2


def test_ling_mini_at_4096_by_term():
    """The hand count of docs/benchmarks.md, term by term (per token, x 6 = fwd + bwd FMAs)."""
    cfg = compose(["+model=ling_mini", "data=mock", "data.seq_length=4096"])
    t = get_family(cfg.model).flops(cfg.model, 4096)
    h, q, kv = 2048, 16 * 128, 4 * 128
    assert t.attention_projections == 6 * 21 * (h * (q + 2 * kv) + q * h)
    assert t.core_attention == 6 * 21 * q * 4096
    assert t.dense_mlp == 6 * 1 * 3 * h * 5120
    assert t.routed_experts == 6 * 20 * 3 * h * 512 * 8
    assert t.shared_experts == 6 * 20 * 3 * h * 512
    assert t.mtp_projections == 6 * (3 * h + 2 * h * h)
    assert t.logits == 6 * h * 157184 * 2
    assert t.total == 9_877_622_784


def test_pattern_must_match_layers():
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        gpt_flops_per_token(
            {"num_layers": 4, "hidden_size": 8, "num_attention_heads": 2, "ffn_hidden_size": 8},
            16,
            8,
            [0, 0, 0],
        )
