"""The one seam between our config and megatron-core's config objects.

Nothing else in the project constructs ``TransformerConfig``, ``DistributedDataParallelConfig``
or megatron's ``OptimizerConfig``. Fields keep megatron-core's names where they pass through,
and :func:`transformer_config_kwargs` returns a plain dict first so tests can check the mapping
field by field (a dropped field is how expert-bias updates silently vanished elsewhere).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ling_pretrain.core.recipes import get_recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def emulates_fp8(cfg: Any) -> bool:
    """Whether the FP8 recipe is emulated (megatron's local layers with emulated GEMMs)."""
    return bool(cfg.fp8.emulate) and cfg.fp8.recipe != "bf16"


def uses_transformer_engine(cfg: Any) -> bool:
    """Whether the model is built from TransformerEngine layer specs (GPU with TE present).

    Never under FP8 emulation: the emulated GEMMs replace megatron's local linear layers.
    """
    import importlib.util

    return (
        torch.cuda.is_available()
        and cfg.run.device != "cpu"
        and not emulates_fp8(cfg)
        and importlib.util.find_spec("transformer_engine") is not None
    )


def moe_layer_pattern(model_cfg: Any) -> list[int]:
    """megatron's ``moe_layer_freq`` list: 0 for the first ``first_k_dense_replace`` layers."""
    k = model_cfg.first_k_dense_replace
    return [0] * k + [1] * (model_cfg.num_layers - k)


def transformer_config_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of megatron-core's ``TransformerConfig`` for a job config."""
    m, p, t, f = cfg.model, cfg.parallel, cfg.trainer, cfg.fp8
    dtype = DTYPES[t.params_dtype]
    on_te = uses_transformer_engine(cfg)
    on_cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
    kwargs: dict[str, Any] = dict(
        # Architecture.
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=True,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # Mixture of experts.
        num_moe_experts=m.num_moe_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size or None,
        moe_layer_freq=moe_layer_pattern(m),
        moe_router_topk=m.moe_router_topk,
        moe_router_num_groups=m.moe_router_num_groups or None,
        moe_router_group_topk=m.moe_router_group_topk or None,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff or None,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=p.moe_token_dispatcher_type,
        moe_grouped_gemm=on_te,
        moe_permute_fusion=False,
        # Padding aligns expert token counts for TE's FP8 grouped GEMMs; megatron accepts it
        # only with TE FP8 on, and emulation runs SequentialMLP experts without it.
        moe_router_padding_for_quantization=f.moe_router_padding_for_quantization
        and not emulates_fp8(cfg),
        # Multi-token prediction.
        mtp_num_layers=m.mtp_num_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        # Parallelism.
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        # Precision and numerics.
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        calculate_per_token_loss=True,
        # Recompute.
        recompute_granularity=t.recompute_granularity,
        recompute_method="uniform" if t.recompute_granularity == "full" else None,
        recompute_num_layers=1 if t.recompute_granularity == "full" else None,
        # Kernels: fusions need CUDA (and some apex/TE); off on the local path.
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_te,
        apply_rope_fusion=False,
        masked_softmax_fusion=on_te,
        bias_activation_fusion=False,
        cross_entropy_loss_fusion=False,
        # Batched p2p posts both directions to the same peer (PP=2 is a ring of two) in one
        # order on every rank; gloo matches messages per peer in posting order and swaps
        # activations with gradients. The unbatched path orders by even/odd rank.
        batch_p2p_comm=on_cuda,
    )
    if t.recompute_granularity == "selective" and t.recompute_modules:
        kwargs["recompute_modules"] = list(t.recompute_modules)
    if f.recipe != "bf16" and not f.emulate:
        recipe = get_recipe(f.recipe)
        kwargs.update(
            fp8=recipe.megatron_format,
            fp8_recipe=recipe.megatron_recipe,
            fp8_param=recipe.fp8_primary_weights or f.fp8_param_gather,
            first_last_layers_bf16=f.first_last_layers_bf16,
            num_layers_at_start_in_bf16=f.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=f.num_layers_at_end_in_bf16,
        )
    return kwargs


def build_transformer_config(cfg: Any):
    """megatron-core ``TransformerConfig`` for a job config."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(cfg))


def build_ddp_config(cfg: Any):
    """megatron-core ``DistributedDataParallelConfig`` for a job config."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        check_for_nan_in_grad=True,
        bucket_size=None if not p.overlap_grad_reduce else 40_000_000,
        average_in_collective=False,
    )


OPTIMIZER_DTYPES = {**DTYPES, "fp8": torch.uint8}
"""Precision-aware optimizer dtypes; megatron-core (and TE's FusedAdam) spell FP8 moments
``torch.uint8``."""


def optimizer_config_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of megatron-core's ``OptimizerConfig`` for a job config.

    ``adam8bit`` is megatron's ``adam`` here: megatron builds its (distributed) optimizer
    around an inner Adam, which :func:`ling_pretrain.optim.build_optimizer` then swaps.
    """
    o, t = cfg.optimizer, cfg.trainer
    dtype = DTYPES[t.params_dtype]
    return dict(
        optimizer="adam" if o.optimizer == "adam8bit" else o.optimizer,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_precision_aware_optimizer=o.use_precision_aware_optimizer,
        main_grads_dtype=OPTIMIZER_DTYPES[o.main_grads_dtype],
        main_params_dtype=OPTIMIZER_DTYPES[o.main_params_dtype],
        exp_avg_dtype=OPTIMIZER_DTYPES[o.exp_avg_dtype],
        exp_avg_sq_dtype=OPTIMIZER_DTYPES[o.exp_avg_sq_dtype],
    )


def build_optimizer_config(cfg: Any):
    """megatron-core ``OptimizerConfig`` for a job config."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(**optimizer_config_kwargs(cfg))
