"""Evaluate a checkpoint (Hugging Face or megatron): LM loss, MTP loss, perplexity, logits.

    # an HF directory; the model comes from its config.json
    python launch/evaluate.py --checkpoint /ckpt/Ling-mini-base-2.0 --tokens ids.npy
    # a run's megatron checkpoint (model from the run's config.yaml), logits saved
    python launch/evaluate.py --checkpoint runs/ling_tiny/checkpoints --tokens ids.npy \\
        --save-logits logits.npz
    # a tokenized corpus, at a parallel layout (run with the layout's world size)
    torchrun --nproc-per-node 2 launch/evaluate.py --checkpoint C --data /data/corpus_text_document \\
        --seq-length 4096 --num-batches 16 parallel.tensor_model_parallel_size=2 \\
        parallel.sequence_parallel=true

--tokens takes a .npy array of token ids [num_sequences, seq_length] (a 1-d stream is cut into
rows of --seq-length). Position i is scored on token i + 1 and MTP position i on token i + 2.
The results are printed as JSON and written to --output; --save-logits writes fp32 `logits`
and `mtp_logits` [num_sequences, seq_length, vocab] to an .npz file. Any config field can be
overridden after the options (e.g. trainer.params_dtype=fp32, +model=ling_mini to check an HF
config.json against a preset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

CONFIG_NAME = "config.yaml"
HF_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="HF directory or megatron checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help=".npy file of token ids [num_sequences, seq_length]")
    src.add_argument("--data", help="prefix of a megatron .bin/.idx dataset")
    p.add_argument("--save-logits", help="write fp32 logits and mtp_logits to this .npz")
    p.add_argument("--output", default="evaluate.json", help="JSON results file")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (--data: default 2048)")
    p.add_argument(
        "--num-batches",
        type=int,
        help="evaluate at most this many batches (--data: exactly this many, default 1)",
    )
    return p


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def _find_saved_config(ckpt: Path) -> Path | None:
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / CONFIG_NAME).is_file():
            return d / CONFIG_NAME
    return None


def _model_overrides(values: dict) -> list[str]:
    return [f"model.{k}={json.dumps(v)}" for k, v in values.items()]


def _has_model(overrides: list[str]) -> bool:
    return any(o.startswith(("+model=", "model=")) for o in overrides)


def job_config(args: argparse.Namespace, overrides: list[str]):
    """(kind, checkpoint path, job config) for the checkpoint; no process group needed."""
    from omegaconf import OmegaConf

    from ling_pretrain.checkpoint.dist import resolve_checkpoint_dir
    from ling_pretrain.config import compose
    from ling_pretrain.config.validate import ConfigError

    path = Path(args.checkpoint)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or directory.")
    base = ["data=mock", "data.num_workers=0", "run.check_memory=false"]
    if (path / "config.json").is_file():
        from ling_pretrain.checkpoint.hf import (
            check_hf_config,
            model_overrides_from_hf,
            read_hf_config,
        )

        if not any(path.glob("*.safetensors")):
            raise ConfigError(
                f"--checkpoint {path} has a config.json but no *.safetensors weights."
            )
        hf = read_hf_config(path)
        dtype = HF_DTYPES.get(str(hf.get("torch_dtype")), "bf16")
        base.append(f"trainer.params_dtype={dtype}")
        if _has_model(overrides):
            cfg = compose([*base, *overrides])
        else:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name) or "hf"
            derived = _model_overrides(model_overrides_from_hf(hf))
            cfg = compose(["+model=ling_mini", *base, f"model.name={name}", *derived, *overrides])
        check_hf_config(hf, cfg.model)
        return "hf", path, cfg
    try:
        ckpt = resolve_checkpoint_dir(str(path))
    except FileNotFoundError as err:
        raise ConfigError(
            f"--checkpoint {path} is neither a Hugging Face directory (config.json + "
            f"safetensors) nor a megatron checkpoint: {err}"
        ) from None
    if _has_model(overrides):
        return "megatron", ckpt, compose([*base, *overrides])
    saved_path = _find_saved_config(ckpt)
    if saved_path is None:
        raise ConfigError(
            f"cannot tell which model {ckpt} holds: no {CONFIG_NAME} in it, its parent or the "
            "run directory above. Name it: add +model=<preset> (and the run's model.* overrides)."
        )
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    dtype = saved.get("trainer", {}).get("params_dtype", "bf16")
    base.append(f"trainer.params_dtype={dtype}")
    cfg = compose(["+model=ling_mini", *base, *_model_overrides(saved["model"]), *overrides])
    _say(f"model {cfg.model.name} from {saved_path}")
    return "megatron", ckpt, cfg


def _progress(done: int, total: int) -> None:
    from ling_pretrain.eval.evaluate import is_reporter

    if is_reporter():
        print(
            f"\revaluated batch {done}/{total}",
            end="\n" if done == total else "",
            file=sys.stderr,
            flush=True,
        )


def run(args: argparse.Namespace, overrides: list[str]) -> dict | None:
    from ling_pretrain.config.validate import ConfigError, validate
    from ling_pretrain.core.io import atomic_write_json
    from ling_pretrain.eval.evaluate import (
        check_tokens,
        evaluate,
        is_reporter,
        load_indexed_tokens,
        load_token_file,
        make_batches,
        save_npz_atomic,
    )
    from ling_pretrain.runtime.distributed import (
        destroy_distributed,
        init_distributed,
        world_size_from_env,
    )

    if args.batch_size < 1 or (args.num_batches is not None and args.num_batches < 1):
        raise ConfigError("--batch-size and --num-batches must be >= 1.")
    kind, ckpt, cfg = job_config(args, overrides)
    m, p = cfg.model, cfg.parallel
    if p.context_parallel_size > 1:
        raise ConfigError("evaluate does not support context parallelism; use CP=1.")
    if args.tokens:
        tokens = load_token_file(args.tokens, args.seq_length)
        source = f"--tokens {args.tokens}"
    else:
        length = args.seq_length or min(2048, m.max_position_embeddings)
        rows = args.batch_size * (args.num_batches or 1)
        tokens = load_indexed_tokens(args.data, rows, length)
        source = f"--data {args.data}"
    check_tokens(tokens, source, m.vocab_size, m.max_position_embeddings)
    seq_length = tokens.shape[1]
    if p.sequence_parallel and seq_length % p.tensor_model_parallel_size:
        raise ConfigError(
            f"sequence parallelism needs the sequence length ({seq_length}) divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}."
        )
    batches = make_batches(tokens, args.batch_size, args.num_batches)
    world = world_size_from_env()
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    cfg.data.seq_length = seq_length
    cfg.trainer.micro_batch_size = args.batch_size
    cfg.trainer.global_batch_size = args.batch_size * max(dp, 1)
    validate(cfg, world)

    init_distributed(cfg)
    try:
        from ling_pretrain.models.ling.builder import build_model

        chunks = build_model(cfg)
        _say(f"loading {kind} checkpoint {ckpt} into {cfg.model.name} ({cfg.trainer.params_dtype})")
        if kind == "hf":
            from ling_pretrain.checkpoint.hf import load_hf_into_model

            load_hf_into_model(str(ckpt), chunks, cfg)
        else:
            from ling_pretrain.checkpoint.dist import load_checkpoint

            load_checkpoint(ckpt, chunks)
        metrics, arrays = evaluate(
            chunks, cfg, batches, keep_logits=bool(args.save_logits), progress=_progress
        )
        result = {
            "checkpoint": str(ckpt),
            "checkpoint_format": kind,
            "model": cfg.model.name,
            "params_dtype": cfg.trainer.params_dtype,
            "sequences": len(batches) * args.batch_size,
            "seq_length": seq_length,
            **metrics,
        }
        if is_reporter():
            if args.save_logits:
                result["logits_file"] = str(save_npz_atomic(args.save_logits, arrays))
            atomic_write_json(args.output, result)
            print(json.dumps(result), flush=True)
        return result
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    from ling_pretrain.config.store import register_schemas
    from ling_pretrain.config.validate import ConfigError
    from ling_pretrain.core.log import setup_logging

    args, overrides = _parser().parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise SystemExit(f"unknown option(s) {' '.join(unknown)}; see --help")
    setup_logging("WARNING")
    register_schemas()
    try:
        run(args, overrides)
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
