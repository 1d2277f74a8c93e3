"""Write megatron model chunks as an HF safetensors checkpoint of the model's family.

Collective: tensor-parallel shards are all-gathered, and the one owner of each tensor
(data-parallel rank 0 of its pipeline stage / expert rank) writes it into its own shard
files, flushed every ``max_shard_bytes``; rank 0 then names the files and writes the index
and the family's ``config.json``. No rank holds more than one shard file's worth of tensors.

FP8 export (``dtype="fp8"``) follows DeepSeek-V3's format: the tensors the family's table
marks ``fp8`` become E4M3 with one fp32 ``weight_scale_inv`` per 128x128 block
(TransformerEngine's blockwise rules, :mod:`ling_pretrain.fp8.quantize`); everything else
stays high precision (bf16), and tensors marked ``fp32`` (the expert bias) stay fp32 in every
export.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ling_pretrain.checkpoint.hf.adapter import CONFIG_FILE, INDEX_FILE, HFAdapter
from ling_pretrain.checkpoint.hf.loader import attention_dims
from ling_pretrain.checkpoint.hf.naming import Ranks, local_tensors
from ling_pretrain.checkpoint.hf.reader import FP8_BLOCK, SCALE_INV_SUFFIX
from ling_pretrain.checkpoint.hf.rules import (
    COLUMN,
    GLU,
    QKV,
    QKV_SPLIT,
    REPLICATED,
    ROW,
    Mapped,
    Rule,
    qkv_mcore_to_hf,
)
from ling_pretrain.core.io import atomic_write_json, default_file_mode
from ling_pretrain.core.log import progress_bar
from ling_pretrain.core.outputs import claim_dir, prepare_staging, publish
from ling_pretrain.fp8.quantize import quantize_blockwise
from ling_pretrain.runtime.distributed import all_gather_objects

logger = logging.getLogger(__name__)

EXPORT_KIND = "Hugging Face export"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}
"""Export dtype -> dtype of the tensors not quantised (FP8 exports keep them bf16)."""


def _gather(tensor: torch.Tensor, expert: bool) -> list[torch.Tensor]:
    """All tensor-parallel shards of ``tensor`` (expert-TP group for routed experts)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = (
        ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
    )
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return [tensor.detach()]
    local = tensor.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=group)
    return shards


def unshard_to_hf(
    rule: Rule, shards: list[torch.Tensor], hf_keys: tuple[str, ...], dims: dict
) -> dict[str, torch.Tensor]:
    """HF tensors from the tensor-parallel shards of one megatron tensor (inverse of
    the loader's per-rank read)."""
    kind = rule.kind
    if kind == REPLICATED:
        return {hf_keys[0]: shards[0]}
    if kind == COLUMN:
        return {hf_keys[0]: torch.cat(shards, 0)}
    if kind == ROW:
        return {hf_keys[0]: torch.cat(shards, 1)}
    if kind == GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {
            hf_keys[0]: torch.cat([h[0] for h in halves], 0),
            hf_keys[1]: torch.cat([h[1] for h in halves], 0),
        }
    if kind in (QKV, QKV_SPLIT):
        full = torch.cat(shards, 0)
        hf = qkv_mcore_to_hf(full, dims["heads"], dims["groups"], dims["head_dim"])
        if kind == QKV:
            return {hf_keys[0]: hf}
        q_rows = dims["heads"] * dims["head_dim"]
        kv_rows = dims["groups"] * dims["head_dim"]
        q, k, v = hf.split([q_rows, kv_rows, kv_rows], dim=0)
        return {hf_keys[0]: q, hf_keys[1]: k, hf_keys[2]: v}
    raise AssertionError(kind)


def _owns(model: Any, canonical: str, mapped: Mapped, par: Ranks) -> bool:
    """Whether this rank's group writes the tensor (one writer per tensor in the world)."""
    if canonical == "embedding.word_embeddings.weight" and not getattr(model, "pre_process", True):
        return False  # MTP's tied copy on a later stage; the first stage's is written
    return (par.expert_dp_rank if mapped.expert else par.dp_rank) == 0


def _to_export(key: str, tensor: torch.Tensor, rule: Rule, dtype: str) -> dict[str, torch.Tensor]:
    if rule.fp32:
        return {key: tensor.float().contiguous()}
    if dtype == "fp8" and rule.fp8:
        q, scale_inv = quantize_blockwise(tensor, FP8_BLOCK, "e4m3", name=key)
        return {key: q.contiguous(), key + SCALE_INV_SUFFIX: scale_inv.float().contiguous()}
    return {key: tensor.to(EXPORT_DTYPES[dtype]).contiguous()}


class _ShardWriter:
    """Accumulates tensors and writes a safetensors file every ``max_bytes``."""

    def __init__(self, out: Path, rank: int, max_bytes: int):
        self.out, self.rank, self.max_bytes = out, rank, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-rank{self.rank:05d}-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        os.chmod(self.out / name, default_file_mode())  # safetensors creates files 0600
        self.files.append(name)
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0


def _copy_template(template_dir: Path, out: Path, patterns: tuple[str, ...]) -> list[str]:
    copied = []
    for pattern in patterns:
        for src in sorted(template_dir.glob(pattern)):
            if src.is_file() and not (out / src.name).exists():
                shutil.copy2(src, out / src.name)
                copied.append(src.name)
    return copied


def export_hf(
    chunks: list,
    cfg: Any,
    adapter: HFAdapter,
    out_dir: str | os.PathLike,
    dtype: str = "bf16",
    template_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the model as an HF checkpoint of its family. Collective: every rank calls it.

    Tensor-parallel shards are gathered; the data-parallel rank 0 of each pipeline stage and
    expert rank writes its own tensors into shard files of at most ``max_shard_bytes`` (one
    tensor larger than that gets a file of its own); rank 0 then names the files
    ``model-0000i-of-0000n.safetensors`` and writes ``model.safetensors.index.json`` and
    ``config.json``. Everything goes to ``<out_dir>.partial`` and is swapped in at the end
    (:mod:`ling_pretrain.core.outputs`): a non-empty ``out_dir`` must be a previous export,
    replaced only with ``overwrite``, and only the files that export wrote are replaced.

    Args:
        chunks: model chunks (``build_model`` output or DDP-wrapped).
        cfg: the job config the chunks were built from.
        adapter: the model family's HF adapter (``get_family(cfg.model).hf``).
        out_dir: the HF directory to write.
        dtype: ``bf16``, ``fp32`` or ``fp8`` (E4M3 linear weights with 128x128 block scales;
            the rest bf16). Tensors whose rule says ``fp32`` are fp32 in every case.
        template_dir: an HF directory whose tokenizer, generation config and modeling code
            are copied (files already written are kept).
        max_shard_bytes: size at which a rank starts a new safetensors file.
        overwrite: replace a previous export in ``out_dir``.

    Returns:
        ``out_dir``.
    """
    import torch.distributed as dist

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
    template = Path(template_dir) if template_dir else None
    if template is not None and not template.is_dir():
        raise FileNotFoundError(f"template directory {template} does not exist")
    claim = claim_dir(out_dir, EXPORT_KIND, overwrite=overwrite)
    out, partial = claim.path, claim.staging
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if rank == 0:
        prepare_staging(claim)
    if distributed:
        dist.barrier()

    par = Ranks.current()
    dims = attention_dims(cfg.model)
    writer = _ShardWriter(partial, rank, max_shard_bytes)
    items = list(local_tensors(chunks))
    errors: list[str] = []
    with torch.no_grad(), progress_bar(len(items), "exporting tensors", "tensor", rank == 0) as bar:
        for model, name, tensor, canonical in items:
            bar.update(1)
            try:
                mapped = adapter.map_canonical(canonical, cfg.model)
            except KeyError:
                errors.append(f"megatron tensor {name} ({canonical}) has no HF mapping")
                continue
            if not _owns(model, canonical, mapped, par):
                continue
            split = mapped.rule.kind != REPLICATED
            shards = _gather(tensor, mapped.expert) if split else [tensor.detach()]
            if (par.etp_rank if mapped.expert else par.tp_rank) != 0:
                continue
            hf = unshard_to_hf(mapped.rule, shards, mapped.hf_keys, dims)
            for key, value in hf.items():
                writer.add(_to_export(key, value, mapped.rule, dtype))
    writer.flush()

    everything = all_gather_objects((errors, writer.files, writer.weight_map))
    if rank == 0:
        problems = [e for errs, _, _ in everything for e in errs]
        weight_map: dict[str, str] = {}
        for _, _, wm in everything:
            for key, file in wm.items():
                if key in weight_map:
                    problems.append(f"{key} was written twice ({weight_map[key]}, {file})")
                weight_map[key] = file
        written = {k for k in weight_map if not k.endswith("_scale_inv")}
        expected = set(adapter.expected_keys(cfg.model))
        if written != expected:
            problems.append(
                f"export incomplete: missing {sorted(expected - written)[:10]}, "
                f"unexpected {sorted(written - expected)[:10]}"
            )
        status = "\n".join(problems)
    else:
        status = ""
    status = all_gather_objects(status)[0]
    if status:
        raise RuntimeError(f"HF export to {out} failed:\n{status}")

    if rank == 0:
        files = [f for _, fs, _ in everything for f in fs]
        n = len(files)
        rename = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
        tensors = {f: 0 for f in files}
        for file in weight_map.values():
            tensors[file] += 1
        total = 0
        for old, new in rename.items():
            os.replace(partial / old, partial / new)
            size = _safetensors_data_bytes(partial / new)
            total += size
            logger.info("wrote %s (%d tensors, %.1f MB)", new, tensors[old], size / 1e6)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: rename[v] for k, v in sorted(weight_map.items())},
        }
        atomic_write_json(partial / INDEX_FILE, index)
        config = adapter.config_json(
            cfg.model, torch_dtype="float32" if dtype == "fp32" else "bfloat16"
        )
        if dtype == "fp8":
            config["quantization_config"] = adapter.fp8_quantization_config(cfg.model, FP8_BLOCK)
        atomic_write_json(partial / CONFIG_FILE, config)
        if template is not None:
            copied = _copy_template(template, partial, adapter.template_patterns)
            logger.info("copied from %s: %s", template, ", ".join(copied) or "nothing")
        else:
            logger.warning(
                "no template directory: %s gets no tokenizer, generation config or modeling "
                "code, so it cannot be served or evaluated with text until they are there. "
                "Pass the HF checkpoint you started from (launch/convert.py --template-dir), or "
                "copy its tokenizer files in.",
                out,
            )
        publish(claim)
        logger.info("wrote %s (%d files, %.1f MB)", out, n, total / 1e6)
    if distributed:
        dist.barrier()
    return out


def _safetensors_data_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header
