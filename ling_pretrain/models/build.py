"""Build megatron-core model chunks for any model family: the only place a ``GPTModel`` is
constructed.

The family supplies the architecture (``TransformerConfig`` fields and ``GPTModel``
arguments); everything else here is model-independent:

* layer specs: TransformerEngine's on GPUs with TE (needed for FP8), megatron's local
  (pure-PyTorch) ones otherwise, with every local norm replaced by our
  :class:`~ling_pretrain.models.norm.RMSNorm` (fp32 compute, sequence-parallel aware). Spec
  functions are called with keyword arguments only, since their positional parameters differ
  between megatron-core releases. MTP layers copy the last decoder layer's spec;
* FP8: the emulated GEMMs (``fp8.emulate``) replace the local linear layers, and on-demand
  transpose is installed on TransformerEngine's FP8 weights;
* two corrections to megatron-core: routed-expert gradients are summed over every rank that
  holds a copy of the expert, and the expert bias must be fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from ling_pretrain.fp8 import te_on_demand_transpose
from ling_pretrain.fp8.megatron_linear import emulated_fp8_layer_specs
from ling_pretrain.models.mcore import (
    build_transformer_config,
    emulates_fp8,
    on_cuda,
    uses_transformer_engine,
)
from ling_pretrain.models.norm import RMSNorm
from ling_pretrain.models.registry import get_family


def _swap_modules(spec: Any, old: tuple, new: type, seen: set | None = None) -> Any:
    """Replace every module class in ``old`` by ``new`` inside a megatron spec tree, in place."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, type):
        return new if spec in old else spec
    seen = set() if seen is None else seen
    if id(spec) in seen:
        return spec
    seen.add(id(spec))
    if isinstance(spec, ModuleSpec):
        if spec.module in old:
            spec.module = new
        _swap_modules(spec.submodules, old, new, seen)
        return spec
    if isinstance(spec, (list, tuple)):
        items = [_swap_modules(s, old, new, seen) for s in spec]
        if isinstance(spec, list):
            spec[:] = items
            return spec
        return type(spec)(items)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            replaced = _swap_modules(value, old, new, seen)
            if replaced is not value:
                setattr(spec, f.name, replaced)
    return spec


def _local_norm_classes() -> tuple:
    """The norm classes megatron's local spec may use (torch's, or apex's when installed)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    classes: list = [WrappedTorchNorm]
    try:
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        classes.append(FusedLayerNorm)
    except ImportError:
        pass
    return tuple(classes)


def build_layer_specs(config: Any, use_te: bool, vp_stage: int | None = None):
    """Decoder block spec and MTP block spec (None when this stage has no MTP layer).

    On the local path every norm is :class:`~ling_pretrain.models.norm.RMSNorm`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    kwargs = {} if use_te else {"normalization": "RMSNorm"}
    block_spec = get_gpt_decoder_block_spec(
        config=config, use_transformer_engine=use_te, vp_stage=vp_stage, **kwargs
    )
    mtp_spec = None
    if config.mtp_num_layers:
        is_last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        if is_last:
            mtp_spec = get_gpt_mtp_block_spec(
                config=config, spec=block_spec, use_transformer_engine=use_te, vp_stage=vp_stage
            )
    if not use_te:
        norms = _local_norm_classes()
        block_spec = _swap_modules(block_spec, norms, RMSNorm)
        if mtp_spec is not None:
            mtp_spec = _swap_modules(mtp_spec, norms, RMSNorm)
    return block_spec, mtp_spec


def build_model_chunk(cfg: Any, config: Any, vp_stage: int | None = None):
    """One pipeline model chunk (all of the model when PP = VPP = 1)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    use_te = uses_transformer_engine(cfg)
    block_spec, mtp_spec = build_layer_specs(config, use_te, vp_stage)
    if emulates_fp8(cfg):
        block_spec, mtp_spec = emulated_fp8_layer_specs(
            block_spec, mtp_spec, config, cfg.fp8, vp_stage=vp_stage
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
        **get_family(cfg.model).gpt_model_kwargs(cfg.model),
    )


def build_model(cfg: Any) -> list:
    """All model chunks of this rank, on its device, before DDP wrapping.

    Requires megatron's parallel state to be initialised. Returns one chunk per virtual
    pipeline stage (a single chunk without VPP).
    """
    config = build_transformer_config(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = [None] if not vpp else list(range(vpp))
    chunks = [build_model_chunk(cfg, config, vp_stage=s) for s in stages]
    if on_cuda(cfg):
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    for chunk in chunks:
        _keep_expert_bias_fp32(chunk)
        _reduce_replicated_experts_over_expert_dp(chunk, config)
    if cfg.fp8.on_demand_transpose and uses_transformer_engine(cfg) and config.fp8_param:
        te_on_demand_transpose.install(chunks)
    return chunks


def _reduce_replicated_experts_over_expert_dp(chunk: Any, config: Any) -> None:
    """Sum routed-expert gradients over every rank that holds a copy of the expert.

    megatron-core sends expert gradients to the expert-data-parallel reduction only when
    ``expert_model_parallel_size > 1``; otherwise they join the dense gradients, reduced over
    the data-parallel group. With TP > 1 and ETP < TP the experts are replicated across
    tensor-parallel ranks that each route different tokens (sequence parallelism), and the
    data-parallel group does not contain those ranks, so each kept only its own tokens'
    share of the expert gradient. The expert-data-parallel group does contain them.
    """
    if config.expert_model_parallel_size > 1:
        return  # megatron marks them itself
    if config.tensor_model_parallel_size == (config.expert_tensor_parallel_size or 1):
        return  # no replication across TP: the data-parallel reduction is the right one
    for name, param in chunk.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False


def _keep_expert_bias_fp32(chunk: Any) -> None:
    """The expert bias is an fp32 buffer whatever the params dtype (it must never round)."""
    for name, buf in chunk.named_buffers():
        if name.endswith("expert_bias") and buf.dtype != torch.float32:
            raise TypeError(f"{name} is {buf.dtype}; the expert bias must stay fp32")
