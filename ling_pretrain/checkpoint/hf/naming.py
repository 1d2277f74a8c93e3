"""Layout-free names of a rank's megatron tensors.

megatron's local layer index becomes the global one (``layer.layer_number - 1`` accounts for
PP/VPP offsets), the local expert index becomes the global expert
(``ep_rank * local_experts + i``), TransformerEngine's fused names
(``linear_qkv.layer_norm_weight``, grouped-GEMM ``linear_fc1.weight{i}``) become the local
spec's names, and megatron-core 0.19's ``mtp_model_layer`` becomes ``transformer_layer``.
Families' tensor tables (:mod:`.adapter`) are written in these names. The TransformerEngine
aliases are used on GPUs only and have not run here; the local spec path is what the CPU
tests check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ling_pretrain.checkpoint.dist import unwrap

# TransformerEngine spec names -> local spec names, inside one layer (unverified on GPUs).
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_TE_GROUPED_RE = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_LOCAL_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")


@dataclass
class Ranks:
    """This rank's positions in the tensor-, expert- and data-parallel groups."""

    tp: int
    tp_rank: int
    etp: int
    etp_rank: int
    ep_rank: int
    dp_rank: int
    expert_dp_rank: int

    @staticmethod
    def current() -> Ranks:
        from megatron.core import parallel_state as ps

        return Ranks(
            tp=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            etp=ps.get_expert_tensor_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            expert_dp_rank=ps.get_expert_data_parallel_rank(),
        )


def _num_local_experts(layer: Any) -> int:
    experts = getattr(layer.mlp, "experts", None)
    if experts is None:
        return 0
    n = getattr(experts, "num_local_experts", None)
    if n is None:
        n = len(experts.local_experts)
    return int(n)


def canonical_name(local: str, chunk: Any, ep_rank: int) -> str | None:
    """Layout-free name of a parameter/buffer of ``chunk``; None for non-tensor state.

    Local layer indices become global ones (``layer_number - 1``), local experts global
    experts, and TransformerEngine's fused names the local spec's.
    """
    if local.endswith("_extra_state"):
        return None
    m = re.match(r"^(decoder\.layers|mtp\.layers)\.(\d+)\.(.*)$", local)
    if not m:
        return local
    block, idx, suffix = m.group(1), int(m.group(2)), m.group(3)
    if block == "decoder.layers":
        layer = chunk.decoder.layers[idx]
        index = layer.layer_number - 1
        prefix = f"decoder.layers.{index}."
    else:
        # megatron-core 0.19 renamed the MTP layer's ``transformer_layer`` to
        # ``mtp_model_layer``; canonical names keep the first spelling.
        mtp_layer = chunk.mtp.layers[idx]
        slot = "transformer_layer" if hasattr(mtp_layer, "transformer_layer") else "mtp_model_layer"
        layer = getattr(mtp_layer, slot)
        prefix = f"mtp.layers.{idx}."
        if not suffix.startswith(slot + "."):
            return prefix + suffix
        suffix = suffix[len(slot) + 1 :]
        prefix += "transformer_layer."
    suffix = _TE_ALIASES.get(suffix, suffix)
    g = _TE_GROUPED_RE.match(suffix) or _LOCAL_EXPERT_RE.match(suffix)
    if g:
        if _TE_GROUPED_RE.match(suffix):
            name, local_e = f"{g.group(1)}.weight", int(g.group(2))
        else:
            local_e, name = int(g.group(1)), g.group(2)
        expert = ep_rank * _num_local_experts(layer) + local_e
        suffix = f"mlp.experts.{expert}.{name}"
    return prefix + suffix


def local_tensors(chunks: list) -> Iterator[tuple[Any, str, torch.Tensor, str]]:
    """(chunk, local name, tensor, canonical name) of every weight and expert bias here."""
    ep_rank = Ranks.current().ep_rank
    for chunk in chunks:
        model = unwrap(chunk)
        seen: set[int] = set()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor is None or not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
                continue
            canonical = canonical_name(name, model, ep_rank)
            if canonical is None:
                continue
            seen.add(id(tensor))
            yield model, name, tensor, canonical
