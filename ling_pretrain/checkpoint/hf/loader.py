"""Load an HF safetensors checkpoint into built megatron model chunks, at any layout.

Streams: each rank opens the safetensors files lazily and reads only the tensors, or the
row/column slices, its own parameters need, one at a time (:class:`~.reader.HFReader`). What
a tensor is made of comes from the family's table (:class:`~.adapter.HFAdapter`); how a kind
is read for one tensor-parallel rank is :func:`read_local` (TP for dense weights, expert-TP
for routed experts). A pipeline stage holding MTP but not the embedding keeps its own (tied)
embedding copy; it is filled too.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ling_pretrain.checkpoint.hf.adapter import HFAdapter, read_hf_config
from ling_pretrain.checkpoint.hf.naming import Ranks, local_tensors
from ling_pretrain.checkpoint.hf.reader import HFReader
from ling_pretrain.checkpoint.hf.rules import (
    COLUMN,
    GLU,
    QKV,
    QKV_SPLIT,
    REPLICATED,
    ROW,
    Mapped,
    tp_slice,
)
from ling_pretrain.core.log import progress_bar
from ling_pretrain.runtime.distributed import all_gather_objects, is_rank0

logger = logging.getLogger(__name__)


def attention_dims(model_cfg: Any) -> dict[str, int]:
    """Heads, key/value groups and head size: what the QKV kinds need."""
    m = model_cfg
    return {"heads": m.num_attention_heads, "groups": m.num_query_groups, "head_dim": m.kv_channels}


def _qkv_rows(key: str, rows: int, heads: int, groups: int, d: int) -> None:
    expected = (heads + 2 * groups) * d
    if rows != expected:
        raise ValueError(
            f"{key} has {rows} rows, expected (heads + 2 x kv_heads) x head_dim = {expected}"
        )


def read_local(reader: HFReader, mapped: Mapped, ranks: Ranks, dims: dict) -> torch.Tensor:
    """Read and transform the HF tensors of one megatron tensor, for this rank's shard only."""
    size, rank = (ranks.etp, ranks.etp_rank) if mapped.expert else (ranks.tp, ranks.tp_rank)
    kind, keys = mapped.rule.kind, mapped.hf_keys
    if kind == REPLICATED:
        return reader.get(keys[0])
    if kind == COLUMN:
        rows = reader.shape(keys[0])[0]
        return reader.get(keys[0], rows=tp_slice(rows, size, rank, keys[0]))
    if kind == ROW:
        cols = reader.shape(keys[0])[1]
        return reader.get(keys[0], cols=tp_slice(cols, size, rank, keys[0]))
    if kind == GLU:
        parts = []
        for key in keys:
            parts.append(reader.get(key, rows=tp_slice(reader.shape(key)[0], size, rank, key)))
        return torch.cat(parts, dim=0)
    if kind in (QKV, QKV_SPLIT):
        heads, groups, d = dims["heads"], dims["groups"], dims["head_dim"]
        gs = tp_slice(groups, size, rank, f"{keys[0]} (key/value groups)")
        per = heads // groups
        if kind == QKV:
            key = keys[0]
            _qkv_rows(key, reader.shape(key)[0], heads, groups, d)
            q = reader.get(key, rows=slice(gs.start * per * d, gs.stop * per * d))
            k = reader.get(key, rows=slice((heads + gs.start) * d, (heads + gs.stop) * d))
            v = reader.get(
                key, rows=slice((heads + groups + gs.start) * d, (heads + groups + gs.stop) * d)
            )
        else:
            qk, kk, vk = keys
            rows = reader.shape(qk)[0] + reader.shape(kk)[0] + reader.shape(vk)[0]
            _qkv_rows(f"{qk} + {kk} + {vk}", rows, heads, groups, d)
            q = reader.get(qk, rows=slice(gs.start * per * d, gs.stop * per * d))
            k = reader.get(kk, rows=slice(gs.start * d, gs.stop * d))
            v = reader.get(vk, rows=slice(gs.start * d, gs.stop * d))
        n = gs.stop - gs.start
        hidden = q.shape[-1]
        return torch.cat(
            [q.reshape(n, per * d, hidden), k.reshape(n, d, hidden), v.reshape(n, d, hidden)], 1
        ).reshape(-1, hidden)
    raise AssertionError(kind)


def load_hf_into_model(
    hf_dir: str | os.PathLike,
    chunks: list,
    cfg: Any,
    adapter: HFAdapter,
    *,
    init_missing_mtp: bool | None = None,
) -> None:
    """Load an HF checkpoint of ``adapter``'s family into built megatron model chunks.

    Works at any layout (TP/PP/VPP/EP/ETP, sequence parallel): each rank reads only the
    tensors, or slices, its own parameters need. Every local parameter and expert bias is
    assigned exactly once. Collective at the end (every rank calls it): the keys read on all
    ranks together must be the whole checkpoint.

    Args:
        hf_dir: HF checkpoint directory (config.json, safetensors, optional index).
        chunks: the list ``build_model(cfg)`` returns, or DDP-wrapped chunks.
        cfg: the job config the chunks were built from.
        adapter: the model family's HF adapter (``get_family(cfg.model).hf``).
        init_missing_mtp: for a checkpoint without MTP layers and a model with them, load
            every other tensor and leave the MTP layers as built (their fresh
            initialisation). Defaults to ``cfg.checkpoint.hf_init_missing_mtp``.

    Raises:
        ConfigError: config.json does not match ``cfg.model``.
        KeyError: tensors missing from or unexpected in the checkpoint (named).
        ValueError: a tensor's shape does not match its parameter.
    """
    if init_missing_mtp is None:
        init_missing_mtp = bool(getattr(cfg.checkpoint, "hf_init_missing_mtp", False))
    hf_config = read_hf_config(hf_dir)
    adapter.check_config(hf_config, cfg.model, init_missing_mtp=init_missing_mtp)
    fresh_mtp = init_missing_mtp and adapter.lacks_mtp(hf_config, cfg.model)
    reader = HFReader(hf_dir)
    expected = set(adapter.expected_keys(cfg.model, with_mtp=not fresh_mtp))
    present = set(reader.keys())
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise KeyError(
            f"{hf_dir} does not hold exactly the tensors of model {cfg.model.name}: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
            f"({len(unexpected)})"
        )
    ranks = Ranks.current()
    dims = attention_dims(cfg.model)
    items = list(local_tensors(chunks))
    if fresh_mtp:
        items = [item for item in items if not item[3].startswith("mtp.")]
        if is_rank0():
            logger.info(
                "%s has no MTP layer: model.mtp_num_layers=%d keeps its fresh initialisation",
                hf_dir,
                cfg.model.mtp_num_layers,
            )
    errors: list[str] = []
    used: set[str] = set()
    assigned: dict[tuple[int, str], str] = {}
    with (
        torch.no_grad(),
        progress_bar(len(items), "loading HF tensors", "tensor", is_rank0()) as bar,
    ):
        for model, name, tensor, canonical in items:
            bar.update(1)
            try:
                mapped = adapter.map_canonical(canonical, cfg.model)
            except KeyError:
                errors.append(f"megatron tensor {name} ({canonical}) has no HF mapping")
                continue
            key = (id(model), canonical)
            if key in assigned:
                errors.append(f"{name} and {assigned[key]} both map to {canonical}")
                continue
            assigned[key] = name
            value = read_local(reader, mapped, ranks, dims)
            if tuple(value.shape) != tuple(tensor.shape):
                errors.append(
                    f"{name}: HF {', '.join(mapped.hf_keys)} gives shape {tuple(value.shape)} on "
                    f"this rank, the parameter has {tuple(tensor.shape)}"
                )
                continue
            tensor.data.copy_(value)
            used.update(mapped.hf_keys)
    reader.close()
    everything = all_gather_objects((errors, sorted(used)))
    all_errors = [e for errs, _ in everything for e in errs]
    if all_errors:
        raise ValueError("loading the HF checkpoint failed:\n" + "\n".join(all_errors[:20]))
    read = set().union(*(set(u) for _, u in everything))
    if read != expected:
        raise KeyError(f"HF tensors no rank loaded: {sorted(expected - read)[:10]}")
