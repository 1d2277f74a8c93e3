"""Every config field reaches megatron-core's config objects (checked on the built objects)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ling_pretrain.config import compose
from ling_pretrain.models.mcore import build_transformer_config, transformer_config_kwargs
from ling_pretrain.models.registry import get_family
from ling_pretrain.optim.mcore import build_optimizer_config
from ling_pretrain.train.ddp import build_ddp_config

OVERRIDES = [
    "+model=ling_tiny",
    "data=mock",
    "model.moe_router_bias_update_rate=0.002",
    "model.moe_z_loss_coeff=1e-5",
    "model.mtp_loss_scaling_factor=0.3",
    "model.first_k_dense_replace=2",
    "parallel.tensor_model_parallel_size=2",
    "parallel.sequence_parallel=true",
    "parallel.expert_model_parallel_size=4",
    "parallel.pipeline_model_parallel_size=2",
    "parallel.virtual_pipeline_model_parallel_size=2",
    "parallel.moe_token_dispatcher_type=allgather",
    "trainer.params_dtype=bf16",
    "trainer.recompute_granularity=selective",
    "trainer.recompute_modules=[moe]",
]

# model field -> TransformerConfig attribute (same name unless listed)
MODEL_RENAMES = {
    "first_k_dense_replace": "moe_layer_freq",
    "vocab_size": None,
    "max_position_embeddings": None,
    "rotary_percent": None,
    "rotary_base": None,
    "rope_scaling": None,
    "rope_scaling_factor": None,
    "name": None,
    "family": None,  # chooses the code that builds the model
    "moe_router_bias_update": None,  # applied around finalize_model_grads (train/moe.py)
}


def test_every_model_field_reaches_transformer_config():
    cfg = compose(OVERRIDES)
    tc = build_transformer_config(cfg)
    for key, value in cfg.model.items():
        target = MODEL_RENAMES.get(key, key)
        if target is None:
            continue  # GPTModel constructor arguments, checked in the builder test
        if key == "first_k_dense_replace":
            assert tc.moe_layer_freq == [0, 0, 1, 1]
        elif key == "moe_z_loss_coeff":
            assert tc.moe_z_loss_coeff == value
        else:
            assert getattr(tc, target) == value, key


# Fields a dense model (llama, qwen3) does not pass to megatron-core: validation requires the
# mixture-of-experts ones to be null and MTP to be off, so the rest have no effect.
DENSE_UNUSED = {
    "first_k_dense_replace",
    "moe_router_topk",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_topk_scaling_factor",
    "moe_router_score_function",
    "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
    "mtp_loss_scaling_factor",
}


@pytest.mark.parametrize("preset", ["llama_tiny", "qwen3_tiny", "llama31_8b", "qwen3_8b"])
def test_every_dense_model_field_reaches_transformer_config(preset):
    cfg = compose([f"+model={preset}", "data=mock", "model.init_method_std=0.01"])
    tc = build_transformer_config(cfg)
    for key, value in cfg.model.items():
        if key in DENSE_UNUSED:
            continue
        target = MODEL_RENAMES.get(key, key)
        if target is None:
            continue  # GPTModel constructor arguments, checked below and in the builder test
        if key == "mtp_num_layers":
            assert value == 0 and tc.mtp_num_layers is None
        elif key in ("num_moe_experts", "moe_ffn_hidden_size"):
            assert value is None and getattr(tc, key) is None, key
        else:
            assert getattr(tc, target) == value, key
    assert tc.moe_layer_freq == 1 and tc.moe_router_topk == 2  # megatron's defaults: unused
    gpt = get_family(cfg.model).gpt_model_kwargs(cfg.model)
    m = cfg.model
    assert gpt == dict(
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=m.rotary_base,
        rope_scaling=m.rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
    )


@pytest.mark.parametrize("preset,qk_norm", [("llama_tiny", False), ("qwen3_tiny", True)])
def test_dense_architecture_switches_are_set(preset, qk_norm):
    tc = build_transformer_config(compose([f"+model={preset}", "data=mock"]))
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.qk_layernorm is qk_norm
    assert tc.activation_func is F.silu and not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.num_moe_experts is None and tc.calculate_per_token_loss
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0


def test_ling_architecture_switches_are_set():
    tc = build_transformer_config(compose(OVERRIDES))
    assert tc.normalization == "RMSNorm" and tc.qk_layernorm and tc.gated_linear_unit
    assert tc.activation_func is F.silu and not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert tc.moe_router_dtype == "fp32" and tc.moe_router_load_balancing_type == "none"
    assert tc.calculate_per_token_loss
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0


def test_parallel_and_precision_fields_reach_transformer_config():
    cfg = compose(OVERRIDES)
    tc = build_transformer_config(cfg)
    for key in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "expert_tensor_parallel_size",
        "context_parallel_size",
        "sequence_parallel",
        "moe_token_dispatcher_type",
    ):
        assert getattr(tc, key) == cfg.parallel[key], key
    assert tc.params_dtype == torch.bfloat16 and tc.bf16 and not tc.fp16
    assert tc.recompute_granularity == "selective" and list(tc.recompute_modules) == ["moe"]


def test_fp8_recipe_maps_to_te_fields():
    kw = transformer_config_kwargs(
        compose(
            [
                *OVERRIDES,
                "fp8.recipe=blockwise_fp8_params",
                "fp8.first_last_layers_bf16=true",
                "fp8.num_layers_at_start_in_bf16=1",
            ]
        )
    )
    assert kw["fp8"] == "e4m3" and kw["fp8_recipe"] == "blockwise" and kw["fp8_param"]
    assert kw["first_last_layers_bf16"] and kw["num_layers_at_start_in_bf16"] == 1
    assert "fp8" not in transformer_config_kwargs(compose(OVERRIDES))


def test_ddp_and_optimizer_configs():
    cfg = compose(
        [
            *OVERRIDES,
            "parallel.overlap_grad_reduce=true",
            "optimizer.lr=1e-4",
            "optimizer.min_lr=1e-5",
            "optimizer.weight_decay=0.05",
            "optimizer.clip_grad=0.5",
            "optimizer.adam_beta2=0.99",
        ]
    )
    ddp = build_ddp_config(cfg)
    assert ddp.use_distributed_optimizer and ddp.overlap_grad_reduce and ddp.grad_reduce_in_fp32
    assert not ddp.average_in_collective  # required by calculate_per_token_loss
    opt = build_optimizer_config(cfg)
    assert (opt.lr, opt.min_lr, opt.weight_decay, opt.clip_grad) == (1e-4, 1e-5, 0.05, 0.5)
    assert (opt.adam_beta1, opt.adam_beta2, opt.bf16) == (0.9, 0.99, True)
    assert opt.use_distributed_optimizer
