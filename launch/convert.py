"""Convert between Hugging Face (BailingMoeV2) checkpoints and megatron checkpoints.

    # HF -> megatron, model taken from config.json, at layout TP1 (one process)
    python launch/convert.py hf-to-mcore --hf-dir /ckpt/Ling-mini-base-2.0 --out-dir /ckpt/mini_mcore
    # ... checked against a preset, built at TP2 (run with the layout's world size)
    torchrun --nproc-per-node 2 launch/convert.py hf-to-mcore --hf-dir D --out-dir O --tp 2 \\
        +model=ling_mini model.rotary_base=10000
    # ... a checkpoint without MTP into a model with MTP (the MTP layer starts fresh)
    python launch/convert.py hf-to-mcore --hf-dir D --out-dir O --init-missing-mtp \\
        model.mtp_num_layers=1

    # megatron -> HF (bf16, fp32 or fp8), tokenizer and modeling code copied from a template
    python launch/convert.py mcore-to-hf --checkpoint runs/x/checkpoints --out-dir /ckpt/x_hf \\
        --dtype bf16 --template-dir /ckpt/Ling-mini-base-2.0

A megatron checkpoint loads at any layout, so the layout of the conversion only decides how
the work (and the memory) is spread; the result is the same. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

logger = logging.getLogger("convert")

CONFIG_NAME = "config.yaml"


def _layout_overrides(args: argparse.Namespace) -> list[str]:
    out = [
        f"parallel.tensor_model_parallel_size={args.tp}",
        f"parallel.pipeline_model_parallel_size={args.pp}",
        f"parallel.expert_model_parallel_size={args.ep}",
        f"parallel.expert_tensor_parallel_size={args.etp}",
        f"parallel.sequence_parallel={'true' if args.tp > 1 else 'false'}",
    ]
    if args.vpp:
        out.append(f"parallel.virtual_pipeline_model_parallel_size={args.vpp}")
    return out


def _job_overrides(args: argparse.Namespace, world: int, params_dtype: str | None) -> list[str]:
    """Settings that let the training config validate for a conversion (no data, no optimizer)."""
    out = [
        "data=mock",
        "data.num_workers=0",
        "run.check_memory=false",
        "trainer.micro_batch_size=1",
        f"trainer.global_batch_size={world * args.pp}",
        *_layout_overrides(args),
    ]
    if params_dtype:
        out.append(f"trainer.params_dtype={params_dtype}")
    if getattr(args, "init_missing_mtp", False):
        out.append("checkpoint.hf_init_missing_mtp=true")
    return out


def _model_overrides(values: dict) -> list[str]:
    return [f"model.{k}={json.dumps(v)}" for k, v in values.items()]


def _has_model(overrides: list[str]) -> bool:
    return any(o.startswith(("+model=", "model=")) for o in overrides)


def _compose(overrides: list[str]):
    from omegaconf import OmegaConf

    from ling_pretrain.config import compose

    cfg = compose(overrides)
    OmegaConf.set_struct(cfg, True)
    # The rotary tables only need to cover one sample; any length the model allows validates.
    cfg.data.seq_length = min(cfg.model.max_position_embeddings, 128)
    return cfg


def _start(cfg) -> None:
    from ling_pretrain.config.validate import validate
    from ling_pretrain.runtime.distributed import init_distributed, world_size_from_env

    validate(cfg, world_size_from_env())
    init_distributed(cfg)


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def _write_config(cfg, path: Path) -> None:
    from omegaconf import OmegaConf

    from ling_pretrain.core.io import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def hf_to_mcore(args: argparse.Namespace, overrides: list[str]) -> None:
    import torch.distributed as dist

    from ling_pretrain.checkpoint.dist import TrainState, save_checkpoint
    from ling_pretrain.checkpoint.hf import (
        check_hf_config,
        load_hf_into_model,
        model_overrides_from_hf,
        read_hf_config,
    )
    from ling_pretrain.runtime.distributed import destroy_distributed, world_size_from_env

    hf = read_hf_config(args.hf_dir)
    out = Path(args.out_dir)
    latest = out / "latest"
    if latest.is_file() and latest.read_text().strip() != "iter_0000000":
        raise SystemExit(
            f"{out} already holds training checkpoints (latest: {latest.read_text().strip()}); "
            "write the converted checkpoint to a new directory."
        )
    dtype = args.dtype or {"float32": "fp32", "float16": "fp16"}.get(
        str(hf.get("torch_dtype")), "bf16"
    )
    base = _job_overrides(args, world_size_from_env(), dtype)
    if _has_model(overrides):
        cfg = _compose([*base, *overrides])
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(args.hf_dir).resolve().name) or "hf"
        derived = _model_overrides(model_overrides_from_hf(hf))
        cfg = _compose(["+model=ling_mini", *base, f"model.name={name}", *derived, *overrides])
    check_hf_config(hf, cfg.model, init_missing_mtp=args.init_missing_mtp)
    _start(cfg)
    from ling_pretrain.models.ling.builder import build_model

    _say(f"building {cfg.model.name} ({cfg.trainer.params_dtype}) and loading {args.hf_dir}")
    chunks = build_model(cfg)
    load_hf_into_model(args.hf_dir, chunks, cfg)
    _say(f"saving the megatron checkpoint to {out}")
    path = save_checkpoint(str(out), TrainState(), chunks, optimizer=None)
    if dist.get_rank() == 0:
        _write_config(cfg, out / CONFIG_NAME)
    dist.barrier()
    _say(f"done: {path} (weights only; train from it with checkpoint.init_from={out})")
    destroy_distributed()


def _find_saved_config(ckpt: Path) -> Path | None:
    """config.yaml beside the checkpoint: in it, in its save_dir, or in the run's output dir."""
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / CONFIG_NAME).is_file():
            return d / CONFIG_NAME
    return None


def mcore_to_hf(args: argparse.Namespace, overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from ling_pretrain.checkpoint.dist import load_checkpoint, resolve_checkpoint_dir
    from ling_pretrain.checkpoint.hf import export_hf
    from ling_pretrain.runtime.distributed import destroy_distributed, world_size_from_env

    ckpt = resolve_checkpoint_dir(args.checkpoint)
    world = world_size_from_env()
    if _has_model(overrides):
        cfg = _compose([*_job_overrides(args, world, args.params_dtype), *overrides])
    else:
        saved_path = _find_saved_config(ckpt)
        if saved_path is None:
            raise SystemExit(
                f"cannot tell which model {ckpt} holds: no {CONFIG_NAME} in it, its parent or "
                "the run directory above. Name it: add +model=<preset> (and any model.* "
                "overrides the run used)."
            )
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
        dtype = args.params_dtype or saved.get("trainer", {}).get("params_dtype")
        cfg = _compose(
            [
                "+model=ling_mini",
                *_job_overrides(args, world, dtype),
                *_model_overrides(saved["model"]),
                *overrides,
            ]
        )
        _say(f"model {cfg.model.name} from {saved_path}")
    _start(cfg)
    from ling_pretrain.models.ling.builder import build_model

    chunks = build_model(cfg)
    _say(f"loading {ckpt}")
    load_checkpoint(ckpt, chunks)
    _say(f"writing {args.dtype} Hugging Face checkpoint to {args.out_dir}")
    out = export_hf(
        chunks,
        cfg,
        args.out_dir,
        dtype=args.dtype,
        template_dir=args.template_dir,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
    )
    _say(f"done: {out}")
    destroy_distributed()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def layout(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("parallel layout (run under torchrun with TP x PP x DP processes)")
        g.add_argument("--tp", type=int, default=1, help="tensor parallel size")
        g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        g.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
        g.add_argument("--ep", type=int, default=1, help="expert parallel size")
        g.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")

    a = sub.add_parser(
        "hf-to-mcore",
        help="HF safetensors -> megatron checkpoint (weights only)",
        description="Extra arguments are config overrides: +model=<preset> checks config.json "
        "against that preset; without it the model is derived from config.json.",
    )
    a.add_argument("--hf-dir", required=True, help="HF checkpoint directory")
    a.add_argument("--out-dir", required=True, help="megatron save_dir to write")
    a.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="params dtype of the megatron checkpoint (default: config.json torch_dtype)",
    )
    a.add_argument(
        "--init-missing-mtp",
        action="store_true",
        help="the checkpoint has no MTP layer but the model has (e.g. +model=ling_mini or "
        "model.mtp_num_layers=1): load every other tensor, keep the MTP layer freshly "
        "initialised",
    )
    layout(a)

    b = sub.add_parser(
        "mcore-to-hf",
        help="megatron checkpoint -> HF safetensors (bf16, fp32 or fp8)",
        description="Extra arguments are config overrides; the model is read from the run's "
        "config.yaml next to the checkpoint, or given with +model=<preset>.",
    )
    b.add_argument("--checkpoint", required=True, help="iter_XXXXXXX dir or its save_dir")
    b.add_argument("--out-dir", required=True, help="HF directory to write")
    b.add_argument("--dtype", choices=("bf16", "fp32", "fp8"), default="bf16")
    b.add_argument("--template-dir", default=None, help="HF dir to copy tokenizer/code from")
    b.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors file size")
    b.add_argument(
        "--params-dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="dtype the checkpoint was trained in (default: from its config.yaml)",
    )
    layout(b)
    return parser


def main(argv: list[str]) -> None:
    from ling_pretrain.config.validate import ConfigError
    from ling_pretrain.core.log import setup_logging

    args, overrides = _parser().parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise SystemExit(f"unknown option(s) {' '.join(unknown)}; see --help")
    setup_logging("INFO")
    try:
        if args.command == "hf-to-mcore":
            hf_to_mcore(args, overrides)
        else:
            mcore_to_hf(args, overrides)
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
