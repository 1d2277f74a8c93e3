"""megatron-core's parallel linear layers with emulated FP8 GEMMs.

Why this module exists
----------------------
``fp8.emulate=true`` trains with an FP8 recipe's rounding on hardware that has no FP8
GEMMs (a CPU, a GPU without TransformerEngine). The model is then built from megatron's
local (pure PyTorch) layer specs, whose linear layers are ``ColumnParallelLinear`` and
``RowParallelLinear``. Both send their GEMM through one hook, ``_forward_impl``, and wrap
the tensor-parallel communication around or inside it:

* column-parallel, TP > 1 without sequence parallelism: the forward input is used as is
  and the input gradient is all-reduced over the TP group (``allreduce_dgrad``);
* column-parallel with sequence parallelism: the sequence-sharded input is all-gathered
  along dim 0 before the GEMM and the input gradient is reduce-scattered along dim 0;
* row-parallel: the GEMM is purely local; the output all-reduce (or reduce-scatter under
  sequence parallelism) happens in ``RowParallelLinear.forward``, outside the hook;
* experts under EP/ETP (``explicit_expert_comm``) and ``disable_grad_reduce`` layers:
  no communication in the hook; the token dispatcher does it.

The subclasses here override only ``_forward_impl``. It performs exactly those
collectives with megatron's own autograd mappings (``copy_to_tensor_model_parallel_region``
is the identity forward and all-reduce backward; ``gather_from_sequence_parallel_region``
is the all-gather forward and reduce-scatter backward), then runs the emulated GEMM on
the tensor the real GEMM would read. Everything else (weights, initialisation, sharded
checkpoints, the output reduction) is inherited unchanged, so a checkpoint written with
emulation loads without it and vice versa. One difference in *how* (not *what*) is
communicated: megatron's fused function saves the local input and all-gathers it again
for the weight gradient, while here autograd keeps the gathered input; that costs memory,
not accuracy.

Which GEMMs are FP8
-------------------
Under TransformerEngine's recipes the FP8 GEMMs are the transformer layers' linear layers:
attention QKV and output projection, the dense MLP's fc1/fc2, every routed expert's and
the shared expert's fc1/fc2, and the same inside the MTP layer's transformer layer. The
embedding, the output layer (lm_head), the routers, the norms and the attention core
(QK^T, softmax, PV) stay in high precision, and so do whole decoder layers named by
``fp8.first_last_layers_bf16``. megatron-core runs the MTP layer under the global FP8
context, so its transformer layer is FP8 whatever the first/last-layer setting; Ling
additionally keeps MTP's ``eh_proj`` in BF16 (``fp8.mtp_projections_bf16``).
:func:`emulated_fp8_layer_specs` rewrites megatron's spec trees to that effect.

The recipes
-----------
:func:`emulation_for_config` maps ``fp8.recipe`` to the operand rule of
``emulation.py``, and every layer runs :func:`ling_pretrain.fp8.emulation.emulated_gemm`
(one autograd function for all recipes) with it:

* ``blockwise`` and ``blockwise_fp8_params`` (TE ``Float8BlockScaling``):
  ``BlockwiseEmulation``, exactly :func:`ling_pretrain.fp8.emulation.emulated_linear`.
  Keeping the primary weights in FP8 (``_fp8_params``) changes memory, not the GEMM
  operands: the FP8 weight is the same 128 x 128-block quantisation of the fp32 master
  weight.
* ``tensorwise`` (TE ``Float8CurrentScaling`` with megatron's ``hybrid`` format):
  ``TensorwiseEmulation``, one exact scale per tensor, E4M3 forward, E5M2 gradients. The
  tensor is the one the GEMM reads: after the sequence-parallel all-gather (TE quantises
  before the all-gather but reduces the amax over the TP group, which gives the same
  scale), and the local shard for a row-parallel input or a column-parallel output
  gradient.
* ``mxfp8`` (TE ``MXFP8BlockScaling``): ``MXFP8Emulation``, 1 x 32 tiles along every
  GEMM's reduction dimension with E8M0 scales rounded as TE's ``float_to_e8m0`` does.

Non-finite operands raise ``FloatingPointError`` in every recipe (the package's default
policy, see ``quantize.py``). Emulated GEMMs are counted by
:func:`ling_pretrain.fp8.emulation.fp8_emulation_stats` / ``fp8_emulation_totals``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from ling_pretrain.core.recipes import FP8_RECIPE_NAMES, RECIPES
from ling_pretrain.fp8.emulation import (
    BlockwiseEmulation,
    FP8EmulationSpec,
    FP8GemmEmulation,
    MXFP8Emulation,
    TensorwiseEmulation,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EMULATED_RECIPES",
    "EmulatedFP8ColumnParallelLinear",
    "EmulatedFP8RowParallelLinear",
    "emulated_fp8_layer_specs",
    "emulated_parallel_linear",
    "emulation_for_config",
    "fp8_emulation_spec",
    "kept_in_bf16",
]

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


EMULATED_RECIPES = FP8_RECIPE_NAMES
"""``fp8.recipe`` values that have FP8 GEMMs to emulate (every FP8 recipe)."""
_BLOCKWISE_RECIPES = tuple(n for n in FP8_RECIPE_NAMES if RECIPES[n].scaling == "blockwise")


def emulation_for_config(fp8_cfg: Any) -> FP8GemmEmulation:
    """The GEMM emulation of ``fp8_cfg.recipe``.

    Args:
        fp8_cfg: An ``FP8Config`` (or anything with a ``recipe`` attribute).

    Returns:
        ``BlockwiseEmulation`` for ``blockwise`` and ``blockwise_fp8_params``,
        ``TensorwiseEmulation`` (E4M3 forward, E5M2 gradients) for ``tensorwise``,
        ``MXFP8Emulation`` (1 x 32, E4M3) for ``mxfp8``.

    Raises:
        ValueError: For ``bf16`` or an unknown recipe; the message lists the valid ones.
    """
    recipe = fp8_cfg.recipe
    if recipe not in EMULATED_RECIPES:
        raise ValueError(
            f"fp8.recipe={recipe!r} has no FP8 GEMMs to emulate; emulated recipes: "
            f"{', '.join(EMULATED_RECIPES)}"
        )
    entry = RECIPES[recipe]
    fmt, grad_fmt = entry.formats
    if entry.scaling == "blockwise":
        spec = FP8EmulationSpec(fmt=fmt, grad_fmt=grad_fmt)
        return BlockwiseEmulation(spec=spec, name=recipe)
    if entry.scaling == "tensorwise":
        return TensorwiseEmulation(fmt=fmt, grad_fmt=grad_fmt)
    return MXFP8Emulation(block=32, fmt=fmt)


def fp8_emulation_spec(fp8_cfg: Any) -> FP8EmulationSpec:
    """The :class:`FP8EmulationSpec` of a blockwise ``fp8_cfg.recipe``.

    ``FP8EmulationSpec`` describes 1 x K activation tiles and square weight blocks with
    fp32 scales, which is the blockwise recipe; per-tensor scales (``tensorwise``) and
    E8M0 scales with re-quantised column-wise weights (``mxfp8``) do not fit it, and are
    emulated by :func:`emulation_for_config` instead.

    Args:
        fp8_cfg: An ``FP8Config``.

    Returns:
        E4M3 everywhere, 1 x 128 activations/gradients, 128 x 128 weights, power-of-2
        scales.

    Raises:
        ValueError: For a recipe that is not blockwise.
    """
    emulation = emulation_for_config(fp8_cfg)
    if not isinstance(emulation, BlockwiseEmulation):
        raise ValueError(
            f"fp8.recipe={fp8_cfg.recipe!r} is not expressible as an FP8EmulationSpec "
            f"(only {', '.join(_BLOCKWISE_RECIPES)} are); use emulation_for_config()"
        )
    return emulation.spec


def emulated_parallel_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gradient_accumulation_fusion: bool = False,
    allreduce_dgrad: bool = False,
    sequence_parallel: bool = False,
    grad_output_buffer: list[torch.Tensor] | None = None,
    wgrad_deferral_limit: int | None = 0,
    async_grad_allreduce: bool | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
    gtp_remat_size: int = 1,
    *,
    gemm: Gemm,
) -> torch.Tensor:
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` with ``gemm``.

    Same arguments and communication as megatron's function (see the module docstring):
    the all-gather / reduce-scatter of sequence parallelism and the all-reduce of the
    input gradient are megatron's autograd mappings around ``gemm``, which computes the
    local ``input @ weight.T (+ bias)`` and its gradients.

    Args:
        input: ``(s, b, in)`` (the local sequence shard under sequence parallelism).
        weight: ``(out_local, in_local)``.
        bias: Optional bias, added by ``gemm``.
        gradient_accumulation_fusion: Must be False (needs APEX's CUDA kernel).
        allreduce_dgrad: All-reduce the input gradient over ``tp_group``.
        sequence_parallel: All-gather the input along dim 0 first (reduce-scatter of
            the input gradient in backward).
        grad_output_buffer: Must be None (deferred embedding wgrad is not emulated).
        wgrad_deferral_limit: Ignored without ``grad_output_buffer``.
        async_grad_allreduce: Deprecated megatron argument; must be None.
        tp_group: The tensor-parallel group; megatron's default one if None.
        gtp_remat_size: megatron-core 0.19's GTP weight-shard count; must be 1.
        gemm: ``(x, weight, bias) -> y``, differentiable.

    Returns:
        ``(s_total, b, out_local)``.

    Raises:
        ValueError: For gradient accumulation fusion, a gradient output buffer, GTP
            weight sharding, or ``allreduce_dgrad`` together with ``sequence_parallel``.
    """
    if gradient_accumulation_fusion:
        raise ValueError(
            "FP8 emulation does not support gradient_accumulation_fusion (APEX's fused "
            "wgrad kernel accumulates an unquantised GEMM into main_grad); turn it off"
        )
    if grad_output_buffer is not None or async_grad_allreduce is not None:
        raise ValueError(
            "FP8 emulation does not support deferred weight-gradient computation "
            "(grad_output_buffer) or the deprecated async_grad_allreduce argument"
        )
    if gtp_remat_size != 1:
        raise ValueError(
            f"FP8 emulation does not support GTP weight sharding (gtp_remat_size="
            f"{gtp_remat_size}); turn GTP off for emulated runs"
        )
    if allreduce_dgrad and sequence_parallel:
        raise ValueError("allreduce_dgrad and sequence_parallel cannot both be set")
    if sequence_parallel:
        total_input = gather_from_sequence_parallel_region(
            input, tensor_parallel_output_grad=True, group=tp_group
        )
    elif allreduce_dgrad:
        total_input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    else:
        total_input = input
    return gemm(total_input, weight, bias)


def _refuse_grad_accumulation_fusion(config: Any, cls: type) -> None:
    if getattr(config, "gradient_accumulation_fusion", False):
        raise ValueError(
            f"{cls.__name__}: config.gradient_accumulation_fusion=True is not supported "
            "with FP8 emulation (the fused kernel would run an unquantised wgrad GEMM); "
            "set gradient_accumulation_fusion=False"
        )


class _EmulatedGemmMixin:
    """Replaces megatron's GEMM (``_forward_impl``) by an emulated FP8 GEMM.

    Takes the wrapped layer's arguments plus ``fp8_emulation`` (the recipe's GEMM emulation;
    blockwise if None); parameters, initialisation, checkpoints and communication stay
    megatron's.

    Raises:
        ValueError: ``config.gradient_accumulation_fusion`` is on.
    """

    def __init__(
        self, *args: Any, fp8_emulation: FP8GemmEmulation | None = None, **kwargs: Any
    ) -> None:
        _refuse_grad_accumulation_fusion(kwargs.get("config"), type(self))
        super().__init__(*args, **kwargs)
        self.fp8_emulation = fp8_emulation or BlockwiseEmulation()

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args, **kwargs):
        return emulated_parallel_linear(
            input, weight, *args, gemm=self.fp8_emulation.linear, **kwargs
        )

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, fp8_emulation={self.fp8_emulation.name})"


class EmulatedFP8ColumnParallelLinear(_EmulatedGemmMixin, ColumnParallelLinear):
    """megatron's ``ColumnParallelLinear`` whose GEMMs are emulated FP8 GEMMs."""


class EmulatedFP8RowParallelLinear(_EmulatedGemmMixin, RowParallelLinear):
    """megatron's ``RowParallelLinear`` whose GEMMs are emulated FP8 GEMMs.

    The GEMM is local; the output all-reduce / reduce-scatter stays in megatron's
    ``forward``.
    """


_EMULATED = {
    ColumnParallelLinear: EmulatedFP8ColumnParallelLinear,
    RowParallelLinear: EmulatedFP8RowParallelLinear,
}


def _emulated_slot(slot: Any, emulation: FP8GemmEmulation, where: str) -> ModuleSpec:
    """A linear-layer slot of a spec, built as the emulated class instead."""
    if isinstance(slot, ModuleSpec):
        cls, params, submodules, metainfo = slot.module, slot.params, slot.submodules, slot.metainfo
    else:
        cls, params, submodules, metainfo = slot, {}, None, {}
    new_cls = _EMULATED.get(cls) if isinstance(cls, type) else None
    if new_cls is None:
        name = getattr(cls, "__name__", repr(cls))
        raise ValueError(
            f"{where} is {name}; FP8 emulation replaces megatron's local ColumnParallelLinear"
            " and RowParallelLinear only. Build the model from local layer specs (no "
            "TransformerEngine, moe_grouped_gemm=False) when fp8.emulate=true."
        )
    return ModuleSpec(
        module=new_cls,
        params={**params, "fp8_emulation": emulation},
        submodules=submodules,
        metainfo=dict(metainfo),
    )


def _submodules(spec: Any) -> Any:
    """The submodules of a spec slot: a ``ModuleSpec``'s, or a ``functools.partial``'s.

    megatron-core 0.19 specs some modules (the MLP, the MoE layer, experts) as
    ``partial(cls_or_builder, submodules=...)`` instead of a ``ModuleSpec``.
    """
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def _convert_mlp(mlp_spec: Any, emulation: FP8GemmEmulation, where: str) -> None:
    sub = _submodules(mlp_spec)
    if not isinstance(sub, MLPSubmodules):
        name = getattr(getattr(mlp_spec, "module", mlp_spec), "__name__", repr(mlp_spec))
        raise ValueError(
            f"{where} is {name} without per-layer linear submodules (a grouped-GEMM expert "
            "module?); FP8 emulation needs megatron's SequentialMLP/MLP (moe_grouped_gemm="
            "False)"
        )
    sub.linear_fc1 = _emulated_slot(sub.linear_fc1, emulation, f"{where}.linear_fc1")
    sub.linear_fc2 = _emulated_slot(sub.linear_fc2, emulation, f"{where}.linear_fc2")


def _convert_transformer_layer(layer_spec: ModuleSpec, emulation: FP8GemmEmulation, where: str):
    """A copy of a ``TransformerLayer`` spec whose FP8 linear layers are emulated."""
    spec = copy.deepcopy(layer_spec)
    sub = spec.submodules
    if not isinstance(sub, TransformerLayerSubmodules):
        raise ValueError(f"{where} is not a TransformerLayer spec: {type(sub).__name__}")
    attn = sub.self_attention
    attn_sub = _submodules(attn)
    if not isinstance(attn_sub, SelfAttentionSubmodules):
        raise ValueError(
            f"{where}.self_attention has submodules {type(attn_sub).__name__}; FP8 emulation "
            "supports megatron's SelfAttention (linear_qkv, linear_proj)"
        )
    attn_sub.linear_qkv = _emulated_slot(
        attn_sub.linear_qkv, emulation, f"{where}.self_attention.linear_qkv"
    )
    attn_sub.linear_proj = _emulated_slot(
        attn_sub.linear_proj, emulation, f"{where}.self_attention.linear_proj"
    )
    mlp_sub = _submodules(sub.mlp)
    if isinstance(mlp_sub, MoESubmodules):
        _convert_mlp(mlp_sub.experts, emulation, f"{where}.mlp.experts")
        if mlp_sub.shared_experts is not None:
            _convert_mlp(mlp_sub.shared_experts, emulation, f"{where}.mlp.shared_experts")
    else:
        _convert_mlp(sub.mlp, emulation, f"{where}.mlp")
    return spec


def kept_in_bf16(fp8_cfg: Any, num_layers: int, layer_no: int) -> bool:
    """Whether decoder layer ``layer_no`` (global, 0-based) stays in high precision.

    Same rule as megatron's ``is_first_last_bf16_layer``, read from our ``FP8Config``.
    """
    if not fp8_cfg.first_last_layers_bf16:
        return False
    return (
        layer_no < fp8_cfg.num_layers_at_start_in_bf16
        or layer_no >= num_layers - fp8_cfg.num_layers_at_end_in_bf16
    )


def emulated_fp8_layer_specs(
    block_spec: Any,
    mtp_spec: Any | None,
    config: Any,
    fp8_cfg: Any,
    *,
    vp_stage: int | None = None,
) -> tuple[Any, Any | None]:
    """Decoder and MTP spec trees whose FP8 GEMMs run through the emulated layers.

    Converted: in every decoder layer not kept in BF16, and in every MTP layer's
    transformer layer, attention ``linear_qkv`` / ``linear_proj`` and the ``linear_fc1`` /
    ``linear_fc2`` of the dense MLP, of every routed expert (``SequentialMLP``) and of the
    shared expert; MTP's ``eh_proj`` too unless ``fp8_cfg.mtp_projections_bf16``.
    Not converted: decoder layers named by ``first_last_layers_bf16``, norms, routers,
    the attention core, and (outside these specs) the embedding and the output layer.

    The MTP transformer layer is converted whatever ``first_last_layers_bf16`` says about
    the last decoder layer it is copied from: megatron-core runs MTP under the global FP8
    context. The inputs are not modified; converted layers are deep copies (module
    classes are not copied), since megatron's spec trees share one spec between layers.

    Args:
        block_spec: ``TransformerBlockSubmodules`` of this pipeline stage, from megatron's
            local (non-TE) specs.
        mtp_spec: ``MultiTokenPredictionBlockSubmodules`` or None.
        config: megatron ``TransformerConfig`` (for the number of layers and this stage's
            layer offset; requires megatron's parallel state).
        fp8_cfg: Our ``FP8Config``; ``recipe`` picks the emulation.
        vp_stage: Virtual pipeline stage of the chunk being built.

    Returns:
        ``(block_spec, mtp_spec)`` with emulated linear layers.

    Raises:
        ValueError: For a recipe with nothing to emulate, or a spec whose linear layers
            are not megatron's local ones (e.g. TransformerEngine or grouped-GEMM specs).
    """
    emulation = emulation_for_config(fp8_cfg)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    layer_specs: list = []
    bf16_layers: list[int] = []
    fp8_layers: list[int] = []
    for i, spec in enumerate(block_spec.layer_specs):
        layer_no = offset + i
        if kept_in_bf16(fp8_cfg, config.num_layers, layer_no):
            bf16_layers.append(layer_no)
            layer_specs.append(spec)
        else:
            fp8_layers.append(layer_no)
            layer_specs.append(
                _convert_transformer_layer(spec, emulation, f"decoder layer {layer_no}")
            )
    new_block = dataclasses.replace(block_spec, layer_specs=layer_specs)

    new_mtp = None
    if mtp_spec is not None:
        mtp_layers = []
        for i, spec in enumerate(mtp_spec.layer_specs):
            layer = copy.copy(spec)
            sub = copy.copy(spec.submodules)
            # megatron-core 0.19 renamed the MTP layer's ``transformer_layer`` slot.
            slot = "transformer_layer" if hasattr(sub, "transformer_layer") else "mtp_model_layer"
            setattr(
                sub,
                slot,
                _convert_transformer_layer(getattr(sub, slot), emulation, f"MTP layer {i} {slot}"),
            )
            if not fp8_cfg.mtp_projections_bf16:
                sub.eh_proj = _emulated_slot(sub.eh_proj, emulation, f"MTP layer {i} eh_proj")
            layer.submodules = sub
            mtp_layers.append(layer)
        new_mtp = dataclasses.replace(mtp_spec, layer_specs=mtp_layers)

    logger.info(
        "FP8 emulation (%s): emulated linear layers in decoder layers %s%s; high precision: "
        "decoder layers %s, embedding, output layer, routers, norms, attention core%s",
        emulation.name,
        fp8_layers,
        "" if new_mtp is None else f" and {len(new_mtp.layer_specs)} MTP layer(s)",
        bf16_layers or "none",
        ", MTP eh_proj" if new_mtp is not None and fp8_cfg.mtp_projections_bf16 else "",
    )
    return new_block, new_mtp
