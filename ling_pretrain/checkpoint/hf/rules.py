"""The vocabulary of HF <-> megatron tensor tables: rule kinds and their pure transforms.

A model family's adapter (``ling_pretrain/models/<family>/hf.py``) describes its checkpoint as
data: one :class:`Rule` per megatron tensor, naming the HF tensors it is made of and the
*kind* of transformation between them. The engine (:mod:`.loader`, :mod:`.exporter`) applies
the kinds; it never names a family. Import and export read the same table, so they cannot
disagree.

Kinds, and how a tensor is split across tensor-parallel ranks:

* ``REPLICATED``: the same tensor on every rank (norms, router, expert bias).
* ``COLUMN``: split along dim 0 (output features, vocabulary rows).
* ``ROW``: split along dim 1 (input features).
* ``QKV``: one fused HF ``[all Q heads | all K heads | all V heads]`` tensor; megatron's
  ``linear_qkv`` interleaves per key/value group ``[q heads of group g, k_g, v_g]``, and a TP
  rank holds a contiguous block of whole groups.
* ``QKV_SPLIT``: the same, from three HF tensors ``q_proj``, ``k_proj``, ``v_proj``.
* ``GLU``: SwiGLU ``linear_fc1``: megatron stores ``[gate; up]`` per TP shard, so the full
  tensor is ``[gate_0; up_0; gate_1; up_1; ...]`` and HF's separate ``gate_proj`` and
  ``up_proj`` are re-assembled from the halves of every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tables are read by tools that never load torch (launch/memory.py)
    import torch

REPLICATED = "replicated"
COLUMN = "column"
ROW = "row"
QKV = "qkv"
QKV_SPLIT = "qkv_split"
GLU = "glu"
KINDS = (REPLICATED, COLUMN, ROW, QKV, QKV_SPLIT, GLU)

EXPERT = "{E}"
"""Placeholder for the global expert number in expert rules (both sides)."""


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensors it is made of."""

    mcore: str
    """Megatron name (the suffix inside a layer for layer rules); ``{E}`` is the global
    expert."""
    hf: tuple[str, ...]
    """HF names (suffixes inside the HF layer prefix for layer rules)."""
    kind: str
    """How it is transformed and split: one of :data:`KINDS`."""
    fp8: bool = False
    """Quantised to E4M3 in an FP8 export."""
    fp32: bool = False
    """Kept fp32 in every export (the expert bias, which must never round)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule {self.mcore}: kind {self.kind!r} is not one of {KINDS}")
        wanted = {GLU: 2, QKV_SPLIT: 3}.get(self.kind, 1)
        if len(self.hf) != wanted:
            raise ValueError(f"rule {self.mcore}: a {self.kind} rule needs {wanted} HF tensor(s)")

    @property
    def expert(self) -> bool:
        """A routed-expert tensor (split by expert-TP, one per global expert)."""
        return EXPERT in self.mcore


@dataclass(frozen=True)
class Mapped:
    """Where one megatron tensor of this rank comes from in the HF checkpoint."""

    canonical: str
    """Layout-free megatron name (global layer and expert numbers)."""
    hf_keys: tuple[str, ...]
    """The HF tensors it is built from."""
    rule: Rule
    expert: bool
    """A routed-expert tensor (split by expert-TP, owned per expert rank)."""


def qkv_hf_to_mcore(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """HF ``[Q|K|V]`` rows -> megatron's per-group ``[q_g..., k_g, v_g]`` rows."""
    import torch

    hidden = w.shape[-1]
    per = heads // groups
    q = w[: heads * head_dim].reshape(groups, per * head_dim, hidden)
    k = w[heads * head_dim : (heads + groups) * head_dim].reshape(groups, head_dim, hidden)
    v = w[(heads + groups) * head_dim :].reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_mcore_to_hf(w: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Megatron's per-group interleaved QKV rows -> HF ``[Q|K|V]`` (inverse of the above)."""
    import torch

    hidden = w.shape[-1]
    per = heads // groups
    g = w.reshape(groups, (per + 2) * head_dim, hidden)
    q = g[:, : per * head_dim].reshape(-1, hidden)
    k = g[:, per * head_dim : (per + 1) * head_dim].reshape(-1, hidden)
    v = g[:, (per + 1) * head_dim :].reshape(-1, hidden)
    return torch.cat([q, k, v], dim=0)


def tp_slice(n: int, size: int, rank: int, what: str) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` rows or columns split ``size`` ways."""
    if n % size:
        raise ValueError(f"{what}: {n} is not divisible by the tensor-parallel size {size}")
    step = n // size
    return slice(rank * step, (rank + 1) * step)
