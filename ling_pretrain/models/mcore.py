"""The one place that builds megatron-core's ``TransformerConfig`` from a job config.

The model family supplies the architecture (:meth:`ModelFamily.transformer_kwargs`); this
module adds what every family shares: parallelism, precision, recompute, kernels, the
runtime settings of routed experts and the FP8 recipe. Fields keep megatron-core's names
where they pass through, and :func:`transformer_config_kwargs` returns a plain dict first so
tests can check the mapping field by field (a dropped field is how expert-bias updates
silently vanished elsewhere).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ling_pretrain.core.dtypes import torch_dtype
from ling_pretrain.core.layout import has_experts
from ling_pretrain.core.recipes import get_recipe
from ling_pretrain.models.registry import get_family


def emulates_fp8(cfg: Any) -> bool:
    """Whether the FP8 recipe is emulated (megatron's local layers with emulated GEMMs)."""
    return bool(cfg.fp8.emulate) and get_recipe(cfg.fp8.recipe).is_fp8


def on_cuda(cfg: Any) -> bool:
    """Whether this job runs on CUDA devices."""
    return torch.cuda.is_available() and cfg.run.device != "cpu"


def uses_transformer_engine(cfg: Any) -> bool:
    """Whether the model is built from TransformerEngine layer specs (GPU with TE present).

    Never under FP8 emulation: the emulated GEMMs replace megatron's local linear layers.
    """
    return (
        on_cuda(cfg)
        and not emulates_fp8(cfg)
        and importlib.util.find_spec("transformer_engine") is not None
    )


def transformer_config_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of megatron-core's ``TransformerConfig`` for a job config."""
    p, t, f = cfg.parallel, cfg.trainer, cfg.fp8
    dtype = torch_dtype(t.params_dtype)
    on_te = uses_transformer_engine(cfg)
    kwargs: dict[str, Any] = get_family(cfg.model).transformer_kwargs(cfg.model)
    if has_experts(cfg.model):
        kwargs.update(
            moe_token_dispatcher_type=p.moe_token_dispatcher_type,
            moe_grouped_gemm=on_te,
            moe_permute_fusion=False,
            # Padding aligns expert token counts for TE's FP8 grouped GEMMs; megatron accepts
            # it only with TE FP8 on, and emulation runs SequentialMLP experts without it.
            moe_router_padding_for_quantization=f.moe_router_padding_for_quantization
            and not emulates_fp8(cfg),
        )
    kwargs.update(
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
        batch_p2p_comm=on_cuda(cfg),
    )
    if t.recompute_granularity == "selective" and t.recompute_modules:
        kwargs["recompute_modules"] = list(t.recompute_modules)
    recipe = get_recipe(f.recipe)
    if recipe.is_fp8 and not f.emulate:
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
