"""The ``launch/convert.py`` commands: Hugging Face checkpoints <-> megatron checkpoints.

A megatron checkpoint loads at any layout, so the layout of a conversion only decides how the
work (and the memory) is spread; the result is the same. The model comes from the checkpoint
(:func:`ling_pretrain.jobs.resolve.resolve_checkpoint`) unless ``+model=`` names it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from ling_pretrain.checkpoint.dist import TrainState, load_checkpoint, save_checkpoint
from ling_pretrain.checkpoint.hf.exporter import EXPORT_KIND, export_hf
from ling_pretrain.checkpoint.hf.loader import load_hf_into_model
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.core.outputs import claim_dir, prepare_staging, publish
from ling_pretrain.jobs.resolve import RUN_CONFIG, resolve_checkpoint
from ling_pretrain.jobs.validate import validate
from ling_pretrain.models.build import build_model
from ling_pretrain.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    is_rank0,
    world_size_from_env,
)

logger = logging.getLogger(__name__)

MCORE_KIND = "megatron conversion"


@dataclass(frozen=True, kw_only=True)
class ConvertLayout:
    """The parallel layout a conversion runs at (launch it with TP x PP x DP processes)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1

    def overrides(self) -> list[str]:
        out = [
            f"parallel.tensor_model_parallel_size={self.tp}",
            f"parallel.pipeline_model_parallel_size={self.pp}",
            f"parallel.expert_model_parallel_size={self.ep}",
            f"parallel.expert_tensor_parallel_size={self.etp}",
            f"parallel.sequence_parallel={'true' if self.tp > 1 else 'false'}",
        ]
        if self.vpp:
            out.append(f"parallel.virtual_pipeline_model_parallel_size={self.vpp}")
        return out


def _base_overrides(layout: ConvertLayout, init_missing_mtp: bool = False) -> list[str]:
    """Settings that let the training config validate for a conversion (no data, no optimizer)."""
    out = [
        "data=mock",
        "data.num_workers=0",
        "run.check_memory=false",
        "trainer.micro_batch_size=1",
        f"trainer.global_batch_size={world_size_from_env() * layout.pp}",
        *layout.overrides(),
    ]
    if init_missing_mtp:
        out.append("checkpoint.hf_init_missing_mtp=true")
    return out


def _say(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def _start(cfg) -> None:
    # The rotary tables only need to cover one sample; any length the model allows validates.
    cfg.data.seq_length = min(cfg.model.max_position_embeddings, 128)
    validate(cfg, world_size_from_env())
    init_distributed(cfg)


def hf_to_mcore(
    hf_dir: str,
    out_dir: str,
    *,
    layout: ConvertLayout = ConvertLayout(),
    dtype: str | None = None,
    init_missing_mtp: bool = False,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Convert an HF checkpoint into a weights-only megatron checkpoint (collective).

    Args:
        hf_dir: the HF directory.
        out_dir: the megatron save_dir to write (with the job's ``config.yaml``).
        layout: the layout to build the model at.
        dtype: params dtype of the result; default: config.json's ``dtype``/``torch_dtype``.
        init_missing_mtp: the checkpoint has no MTP layer but the model has; keep it fresh.
        overwrite: replace a previous conversion in ``out_dir`` (never anything else).
        overrides: Hydra overrides (``+model=<preset>`` checks config.json against it).
    """
    claim = claim_dir(out_dir, MCORE_KIND, overwrite=overwrite)
    base = _base_overrides(layout, init_missing_mtp)
    resolved = resolve_checkpoint(hf_dir, overrides, base, params_dtype=dtype)
    if resolved.kind != "hf":
        raise ConfigError(f"--hf-dir {hf_dir} is not a Hugging Face directory (no config.json).")
    cfg = resolved.cfg
    _start(cfg)
    try:
        _say(f"building {cfg.model.name} ({cfg.trainer.params_dtype}) and loading {hf_dir}")
        chunks = build_model(cfg)
        load_hf_into_model(hf_dir, chunks, cfg, resolved.family.hf)
        _say(f"saving the megatron checkpoint to {claim.path}")
        if dist.get_rank() == 0:
            prepare_staging(claim)
        dist.barrier()
        saved = save_checkpoint(str(claim.staging), TrainState(), chunks, optimizer=None)
        if dist.get_rank() == 0:
            atomic_write_text(claim.staging / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
            publish(claim)
        dist.barrier()
        path = claim.path / saved.name
        _say(f"done: {path} (weights only; train from it with checkpoint.init_from={claim.path})")
        return path
    finally:
        destroy_distributed()


def mcore_to_hf(
    checkpoint: str,
    out_dir: str,
    *,
    layout: ConvertLayout = ConvertLayout(),
    dtype: str = "bf16",
    template_dir: str | None = None,
    max_shard_gb: float = 4.0,
    params_dtype: str | None = None,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Export a megatron checkpoint as an HF checkpoint of its family (collective).

    Args:
        checkpoint: an ``iter_XXXXXXX`` directory or its save_dir.
        out_dir: the HF directory to write.
        layout: the layout to build the model at.
        dtype: ``bf16``, ``fp32`` or ``fp8``.
        template_dir: an HF directory to copy the tokenizer and modeling code from.
        max_shard_gb: safetensors file size.
        params_dtype: the dtype the checkpoint was trained in; default: its config.yaml's.
        overwrite: replace a previous export in ``out_dir`` (only the files it wrote).
        overrides: Hydra overrides (``+model=<preset>`` when there is no config.yaml).
    """
    claim_dir(out_dir, EXPORT_KIND, overwrite=overwrite)  # before any work; again on export
    resolved = resolve_checkpoint(
        checkpoint, overrides, _base_overrides(layout), params_dtype=params_dtype
    )
    if resolved.kind != "megatron":
        raise ConfigError(
            f"--checkpoint {checkpoint} is a Hugging Face directory, not a megatron checkpoint."
        )
    cfg = resolved.cfg
    _say(f"model {cfg.model.name} from {resolved.source}")
    _start(cfg)
    try:
        chunks = build_model(cfg)
        _say(f"loading {resolved.path}")
        load_checkpoint(resolved.path, chunks)
        _say(f"writing {dtype} Hugging Face checkpoint to {out_dir}")
        out = export_hf(
            chunks,
            cfg,
            resolved.family.hf,
            out_dir,
            dtype=dtype,
            template_dir=template_dir,
            max_shard_bytes=int(max_shard_gb * 1024**3),
            overwrite=overwrite,
        )
        _say(f"done: {out}")
        return out
    finally:
        destroy_distributed()
