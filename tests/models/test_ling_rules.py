"""Model settings megatron-core would mishandle are refused by validation, naming the fix."""

from __future__ import annotations

import pytest

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import validate


def _errors(overrides: list[str], world: int = 1) -> str:
    cfg = compose(["+model=ling_tiny", "data=mock", "run.check_memory=false", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    return str(err.value)


def test_vocabulary_must_split_evenly_over_tp():
    msg = _errors(
        [
            "model.vocab_size=8191",
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
        ],
        world=2,
    )
    assert "model.vocab_size=8191 is not divisible by parallel.tensor_model_parallel_size=2" in msg


def test_unknown_bias_update_rule_is_refused():
    msg = _errors(["model.moe_router_bias_update=zero-mean"])
    assert "model.moe_router_bias_update='zero-mean' must be 'megatron' or 'zero_mean'" in msg


def test_more_than_one_mtp_layer_is_refused():
    assert "model.mtp_num_layers=2" in _errors(["model.mtp_num_layers=2"])


def test_group_score_rule_of_the_hf_checkpoints_is_enforced():
    msg = _errors(["model.moe_router_topk=2"])
    assert "moe_router_topk=2 != 2 x moe_router_group_topk=2" in msg


@pytest.mark.parametrize("rule", ["megatron", "zero_mean"])
def test_both_bias_rules_validate(rule):
    cfg = compose(["+model=ling_tiny", "data=mock", f"model.moe_router_bias_update={rule}"])
    validate(cfg, 1)


def test_ling_keeps_qk_norm_and_has_no_rope_scaling():
    assert "model.qk_layernorm=false: every Ling 2.0 model has QK-norm" in _errors(
        ["model.qk_layernorm=false"]
    )
    assert "model.rope_scaling=true is Llama-3.1's RoPE scaling" in _errors(
        ["model.rope_scaling=true"]
    )
