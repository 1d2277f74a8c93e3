"""The ``launch/evaluate.py`` command: resolve the checkpoint, check the tokens, build the
model at the requested layout, load, evaluate, report."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ling_pretrain.checkpoint.dist import load_checkpoint
from ling_pretrain.checkpoint.hf.loader import load_hf_into_model
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_json
from ling_pretrain.core.outputs import claim_file
from ling_pretrain.eval.evaluate import (
    check_tokens,
    evaluate,
    is_reporter,
    load_indexed_tokens,
    load_token_file,
    make_batches,
    save_npz_atomic,
)
from ling_pretrain.jobs.resolve import resolve_checkpoint
from ling_pretrain.jobs.validate import validate
from ling_pretrain.models.build import build_model
from ling_pretrain.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    is_rank0,
    world_size_from_env,
)

BASE_OVERRIDES = ("data=mock", "data.num_workers=0", "run.check_memory=false")
"""What evaluation needs of a training config: no data pipeline, no memory-fit check."""


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """What to evaluate, as ``launch/evaluate.py`` takes it."""

    checkpoint: str
    tokens: str | None = None
    data: str | None = None
    save_logits: str | None = None
    output: str = "evaluate.json"
    batch_size: int = 1
    seq_length: int | None = None
    num_batches: int | None = None


def _is_our_json(path: Path) -> bool:
    """A results file an earlier evaluation wrote."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"checkpoint_format", "lm_loss"} <= data.keys()


def _is_our_npz(path: Path) -> bool:
    """A logits file an earlier evaluation wrote."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return "logits" in arrays.files and set(arrays.files) <= {"logits", "mtp_logits"}
    except (OSError, ValueError):
        return False


def _say(msg: str) -> None:
    if is_rank0():
        print(msg, file=sys.stderr, flush=True)


def _progress(done: int, total: int) -> None:
    if is_reporter():
        print(
            f"\revaluated batch {done}/{total}",
            end="\n" if done == total else "",
            file=sys.stderr,
            flush=True,
        )


def run_evaluation(request: EvalRequest, overrides: Sequence[str] = ()) -> dict:
    """Evaluate a checkpoint; prints the result as JSON and writes it to ``request.output``.

    Raises:
        ConfigError: a bad checkpoint path, token file or layout, before the model is built.
    """
    r = request
    if r.batch_size < 1 or (r.num_batches is not None and r.num_batches < 1):
        raise ConfigError("--batch-size and --num-batches must be >= 1.")
    if (r.tokens is None) == (r.data is None):
        raise ConfigError("give exactly one of --tokens and --data.")
    claim_file(r.output, "--output", _is_our_json)
    if r.save_logits:
        claim_file(r.save_logits, "--save-logits", _is_our_npz)
    resolved = resolve_checkpoint(r.checkpoint, overrides, BASE_OVERRIDES)
    cfg = resolved.cfg
    m, p = cfg.model, cfg.parallel
    if p.context_parallel_size > 1:
        raise ConfigError("evaluate does not support context parallelism; use CP=1.")
    if r.tokens:
        tokens = load_token_file(r.tokens, r.seq_length)
        source = f"--tokens {r.tokens}"
    else:
        length = r.seq_length or min(2048, m.max_position_embeddings)
        tokens = load_indexed_tokens(r.data, r.batch_size * (r.num_batches or 1), length)
        source = f"--data {r.data}"
    check_tokens(tokens, source, m.vocab_size, m.max_position_embeddings)
    seq_length = tokens.shape[1]
    if p.sequence_parallel and seq_length % p.tensor_model_parallel_size:
        raise ConfigError(
            f"sequence parallelism needs the sequence length ({seq_length}) divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}."
        )
    batches = make_batches(tokens, r.batch_size, r.num_batches)
    world = world_size_from_env()
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    cfg.data.seq_length = seq_length
    cfg.trainer.micro_batch_size = r.batch_size
    cfg.trainer.global_batch_size = r.batch_size * max(dp, 1)
    validate(cfg, world)

    init_distributed(cfg)
    try:
        chunks = build_model(cfg)
        _say(
            f"model {cfg.model.name} from {resolved.source}; loading {resolved.kind} checkpoint "
            f"{resolved.path} ({cfg.trainer.params_dtype})"
        )
        if resolved.kind == "hf":
            load_hf_into_model(str(resolved.path), chunks, cfg, resolved.family.hf)
        else:
            load_checkpoint(resolved.path, chunks)
        metrics, arrays = evaluate(
            chunks, cfg, batches, keep_logits=bool(r.save_logits), progress=_progress
        )
        result = {
            "checkpoint": str(resolved.path),
            "checkpoint_format": resolved.kind,
            "model": cfg.model.name,
            "params_dtype": cfg.trainer.params_dtype,
            "sequences": len(batches) * r.batch_size,
            "seq_length": seq_length,
            **metrics,
        }
        if is_reporter():
            if r.save_logits:
                result["logits_file"] = str(save_npz_atomic(r.save_logits, arrays))
            atomic_write_json(r.output, result)
            print(json.dumps(result), flush=True)
        return result
    finally:
        destroy_distributed()
