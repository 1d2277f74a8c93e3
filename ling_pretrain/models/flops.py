"""Training FLOPs per token of a GPT model on megatron-core, in Megatron-LM's convention.

Megatron-LM's ``num_floating_point_operations`` (``megatron/training/training.py``) is the
convention behind Ling's published 133.7 TFLOP/s per GPU and Megatron-Bridge's tables, so
figures computed here compare with theirs. It counts the matrix multiplications of one
training step, per token:

* ``3 x 2 x`` each GEMM's ``m x n`` per token: 2 for the multiply-add, 3 for the forward
  pass, the data gradient and the weight gradient;
* attention in every decoder layer: the QKV projection ``h x (q + 2 kv)``, the output
  projection ``q x h`` and core attention ``q x s / 2 x 2`` (``QK^T`` and ``PV``; the causal
  mask halves the square), with ``q = heads x head_dim`` and ``kv = groups x head_dim``;
* a dense layer's SwiGLU MLP ``3 x h x ffn`` (gate and up, then down);
* an MoE layer's routed experts ``3 x h x moe_ffn x top-k`` plus its shared expert
  ``3 x h x shared_ffn``; the router is not counted;
* each MTP layer as one more decoder layer (MoE if the last decoder layer is), plus its
  ``eh_proj`` (``2h x h``) and a ``3h`` term Megatron-LM adds for its norms;
* the logits ``h x vocab`` once for the model and once per MTP layer.

Embedding lookups, norms (except that MTP term), RoPE, softmax, the loss and the router are
left out. :class:`FlopsPerToken` also reports the two largest terms the convention leaves
out (the router GEMM and the masked half of core attention), which is what an operation
counter such as ``torch.utils.flop_counter`` sees on top (tests/models/test_flops.py).

Megatron-LM pads the vocabulary to a multiple of 128 x TP; this trainer builds the
vocabulary it is given, so the logits term uses ``vocab_size`` (every shipped preset's is a
multiple of 128 already).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

FWD_BWD = 3
"""Forward, data gradient, weight gradient: each GEMM runs three times per training step."""
FMA = 2
"""A multiply-add is two floating-point operations."""


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs (forward + backward) per token, by term. :attr:`total` is the
    convention's figure; ``router`` and ``masked_core_attention`` are not part of it."""

    attention_projections: float
    """QKV and output projections of every decoder and MTP layer."""
    core_attention: float
    """``QK^T`` and ``PV`` under the causal mask (half the square)."""
    dense_mlp: float
    """SwiGLU MLPs of the dense layers (MTP layers included when they are dense)."""
    routed_experts: float
    """The top-k routed experts of every MoE layer (MTP layers included when MoE)."""
    shared_experts: float
    """The shared expert of every MoE layer."""
    mtp_projections: float
    """Each MTP layer's ``eh_proj`` and Megatron-LM's ``3h`` norm term."""
    logits: float
    """The output layer, once for the model and once per MTP layer."""
    router: float
    """Not counted: the router GEMM ``h x experts`` of every MoE layer."""
    masked_core_attention: float
    """Not counted: the masked half of core attention, which kernels without causal
    skipping (megatron's local attention, SDPA's math path) still compute."""

    @property
    def total(self) -> float:
        """FLOPs per token in Megatron-LM's convention."""
        return (
            self.attention_projections
            + self.core_attention
            + self.dense_mlp
            + self.routed_experts
            + self.shared_experts
            + self.mtp_projections
            + self.logits
        )

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def gpt_flops_per_token(
    transformer: dict[str, Any], vocab_size: int, seq_length: int, moe_pattern: list[int]
) -> FlopsPerToken:
    """FLOPs per token of a megatron-core GPT model with SwiGLU (or plain) MLPs.

    Args:
        transformer: the architecture's ``TransformerConfig`` fields, megatron-core's names
            (a family's ``transformer_kwargs``); absent MoE and MTP fields mean none.
        vocab_size: the output layer's width.
        seq_length: tokens per sample (core attention grows with it).
        moe_pattern: per decoder layer, 1 for an MoE layer, 0 for a dense one.
    """
    t = transformer
    h = t["hidden_size"]
    heads = t["num_attention_heads"]
    head_dim = t.get("kv_channels") or h // heads
    groups = t.get("num_query_groups") or heads
    q, kv = heads * head_dim, groups * head_dim
    glu = 3 if t.get("gated_linear_unit", False) else 2
    mtp = t.get("mtp_num_layers") or 0
    if len(moe_pattern) != t["num_layers"]:
        raise ValueError(f"moe_pattern has {len(moe_pattern)} entries for {t['num_layers']} layers")
    experts = t.get("num_moe_experts") or 0
    moe_layers = sum(moe_pattern) if experts else 0
    dense_layers = t["num_layers"] - moe_layers
    last_is_moe = bool(experts and moe_pattern[-1])
    moe_layers += mtp if last_is_moe else 0
    dense_layers += 0 if last_is_moe else mtp
    layers = t["num_layers"] + mtp

    moe_ffn = t.get("moe_ffn_hidden_size") or t.get("ffn_hidden_size", 0)
    shared_ffn = t.get("moe_shared_expert_intermediate_size") or 0
    topk = t.get("moe_router_topk", 0) if experts else 0
    c = FWD_BWD * FMA
    return FlopsPerToken(
        attention_projections=c * layers * (h * (q + 2 * kv) + q * h),
        core_attention=c * layers * (q * seq_length / 2 * 2),
        dense_mlp=c * dense_layers * glu * h * t["ffn_hidden_size"],
        routed_experts=c * moe_layers * glu * h * moe_ffn * topk,
        shared_experts=c * moe_layers * glu * h * shared_ffn,
        mtp_projections=c * mtp * (3 * h + 2 * h * h),
        logits=c * h * vocab_size * (1 + mtp),
        router=c * moe_layers * h * experts,
        masked_core_attention=c * layers * (q * seq_length / 2 * 2),
    )
