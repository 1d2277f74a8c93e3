"""Evaluate a checkpoint: LM loss, MTP loss, perplexity, and optionally the logits of both heads.

This is how a user checks that a converted checkpoint is the same model: run it on a fixed
token file here and in the other implementation and compare the numbers or the logits.

The forward pass is the trainer's (:func:`ling_pretrain.train.step.forward_step` through
megatron's pipeline schedule, forward only), so every layout that trains evaluates too. The
logits are read where megatron produces them, at the output layer of the last pipeline stage:
megatron calls it once per MTP layer and then once for the main head, each time with this
tensor-parallel rank's slice of the vocabulary, and the slices are gathered here. Every
data-parallel replica evaluates the same batches (evaluation data is small; it keeps the
expert-parallel all-to-alls in step without splitting the data), and one process reports:
data-parallel rank 0, tensor-parallel rank 0 of the last pipeline stage.

Sequences are rows of token ids ``[num_sequences, seq_length]``; position ``i`` predicts token
``i + 1`` (the last position has no label), MTP position ``i`` predicts token ``i + 2``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ling_pretrain.checkpoint.dist import unwrap
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write
from ling_pretrain.train.mtp import mtp_token_mask
from ling_pretrain.train.step import forward_step


def check_tokens(tokens: np.ndarray, source: str, vocab_size: int, max_positions: int) -> None:
    """Refuse token arrays the model cannot evaluate, naming the problem and the fix.

    Raises:
        ConfigError: wrong dtype or shape, too short or too long rows, ids outside the vocab.
    """
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(
            f"{source}: token ids must be integers, got dtype {tokens.dtype}; save them with "
            "np.save(path, ids.astype(np.int32))."
        )
    if tokens.ndim != 2:
        raise ConfigError(
            f"{source}: expected a 2-d array [num_sequences, seq_length], got shape "
            f"{tokens.shape}; reshape a 1-d stream first, or pass --seq-length to cut it into rows."
        )
    rows, length = tokens.shape
    if rows == 0 or length < 3:
        raise ConfigError(
            f"{source}: shape {tokens.shape} needs at least one sequence of 3 or more tokens "
            "(LM and MTP predict 1 and 2 tokens ahead)."
        )
    if length > max_positions:
        raise ConfigError(
            f"{source}: sequences of {length} tokens exceed model.max_position_embeddings="
            f"{max_positions}; use shorter rows (--seq-length) or raise the override."
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))[0]
        raise ConfigError(
            f"{source}: token id {int(tokens[tuple(bad)])} at [{bad[0]}, {bad[1]}] is outside the "
            f"model's vocabulary [0, {vocab_size}); were these ids made by this model's tokenizer?"
        )


def load_token_file(path: str, seq_length: int | None) -> np.ndarray:
    """A ``.npy`` file of token ids; a 1-d stream is cut into rows of ``seq_length``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--tokens {path}: no such file.")
    try:
        tokens = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--tokens {path} is not a .npy array file ({err}).") from None
    if tokens.ndim == 1 and seq_length:
        rows = len(tokens) // seq_length
        tokens = tokens[: rows * seq_length].reshape(rows, seq_length)
    elif seq_length and tokens.ndim == 2 and seq_length < tokens.shape[1]:
        tokens = tokens[:, :seq_length]
    return np.asarray(tokens)


def load_indexed_tokens(prefix: str, rows: int, seq_length: int) -> np.ndarray:
    """``rows`` sequences of ``seq_length`` tokens from a megatron ``.bin/.idx`` dataset,
    documents concatenated in order (the training data's end-of-document tokens included)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise ConfigError(
                f"--data {prefix}: {prefix + suffix} does not exist; give the path prefix of a "
                "megatron indexed dataset (without .bin/.idx), see docs/data.md."
            )
    dataset = IndexedDataset(prefix, mmap=True)
    need = rows * seq_length
    parts, have = [], 0
    for i in range(len(dataset)):
        doc = np.asarray(dataset[i])
        parts.append(doc[: need - have])
        have += len(parts[-1])
        if have >= need:
            break
    if have < need:
        raise ConfigError(
            f"--data {prefix} holds {have} tokens, fewer than --num-batches x --batch-size x "
            f"--seq-length = {need}; ask for fewer batches or shorter sequences."
        )
    return np.concatenate(parts).reshape(rows, seq_length)


def make_batches(tokens: np.ndarray, batch_size: int, num_batches: int | None) -> list[dict]:
    """Micro-batches in the trainer's format (tokens, labels, loss_mask, position_ids)."""
    rows, length = tokens.shape
    count = rows // batch_size
    if count == 0:
        raise ConfigError(
            f"{rows} sequence(s) do not fill one batch of --batch-size {batch_size}; lower it."
        )
    if num_batches:
        count = min(count, num_batches)
    batches = []
    for i in range(count):
        ids = torch.from_numpy(np.array(tokens[i * batch_size : (i + 1) * batch_size])).long()
        labels = torch.zeros_like(ids)
        labels[:, :-1] = ids[:, 1:]
        mask = torch.ones(ids.shape, dtype=torch.float32)
        mask[:, -1] = 0.0
        batches.append(
            {
                "tokens": ids,
                "labels": labels,
                "loss_mask": mask,
                "position_ids": torch.arange(length).expand(batch_size, length).clone(),
            }
        )
    return batches


def _gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from this tensor-parallel rank's slice (collective over TP)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


def is_reporter() -> bool:
    """The one process that holds the results: last stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    )


@torch.no_grad()
def evaluate(
    model: list,
    cfg: Any,
    batches: list[dict],
    keep_logits: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Run ``batches`` through the model, forward only. Collective over the world.

    Returns:
        The metrics (same on every rank: ``lm_loss``, ``lm_tokens``, ``perplexity``,
        ``mtp_loss``, ``mtp_tokens``, ``mtp_perplexity``; MTP ones None without MTP) and, on
        the reporting process when ``keep_logits``, fp32 ``logits`` and ``mtp_logits``
        ``[num_sequences, seq_length, vocab]`` (empty elsewhere).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    mtp_layers = cfg.model.mtp_num_layers
    vocab = cfg.model.vocab_size
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    calls: list[torch.Tensor] = []
    hook = None
    if last:
        # Clone: megatron's cross entropy then works on the logits in place.
        head = unwrap(model[-1]).output_layer
        hook = head.register_forward_hook(lambda _m, _i, out: calls.append(out[0].clone()))
    for chunk in model:
        chunk.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # lm sum, lm tokens, mtp sum, mtp tokens
    kept: dict[str, list] = {"logits": [], "mtp_logits": []}
    schedule = get_forward_backward_func()
    try:
        for i, batch in enumerate(batches):
            calls.clear()
            batch_size, seq_length = batch["tokens"].shape
            losses = schedule(
                forward_step_func=forward_step,
                data_iterator=[iter([dict(batch)]) for _ in model],
                model=model,
                num_microbatches=1,
                seq_length=seq_length,
                micro_batch_size=batch_size,
                forward_only=True,
            )
            if last:
                if len(calls) != mtp_layers + 1:
                    raise RuntimeError(
                        f"the output layer ran {len(calls)} times for one batch; expected "
                        f"{mtp_layers + 1} (MTP layers, then the main head)"
                    )
                lm = losses[0]["lm loss"].double()
                sums[0] += lm[0]
                sums[1] += lm[1]
                if keep_logits:
                    full = _gather_vocab(calls[-1], vocab)
                    kept["logits"].append(full.transpose(0, 1).float().cpu())
                if mtp_layers:
                    mtp_logits = calls[0]  # [s, b, vocab / TP]
                    if keep_logits:
                        full = _gather_vocab(mtp_logits, vocab)
                        kept["mtp_logits"].append(full.transpose(0, 1).float().cpu())
                    target = torch.roll(batch["labels"], shifts=-1, dims=-1)
                    mask = mtp_token_mask(batch["loss_mask"])
                    # On a copy: megatron's cross entropy works in place, and the kept
                    # logits may be a view of this tensor.
                    ce = vocab_parallel_cross_entropy(
                        mtp_logits.float().clone(), target.t().contiguous().to(mtp_logits.device)
                    )
                    sums[2] += (ce.t().cpu().double() * mask.double()).sum()
                    sums[3] += mask.sum()
            if progress is not None:
                progress(i + 1, len(batches))
    finally:
        if hook is not None:
            hook.remove()
    if not is_reporter():
        sums.zero_()
    dist.all_reduce(sums)
    lm_loss = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
    metrics: dict[str, Any] = {
        "lm_loss": lm_loss,
        "lm_tokens": int(sums[1]),
        "perplexity": math.exp(lm_loss) if lm_loss < 700 else float("inf"),
        "mtp_loss": None,
        "mtp_tokens": None,
        "mtp_perplexity": None,
    }
    if mtp_layers:
        mtp_loss = float(sums[2] / sums[3]) if sums[3] > 0 else float("nan")
        metrics.update(
            mtp_loss=mtp_loss,
            mtp_tokens=int(sums[3]),
            mtp_perplexity=math.exp(mtp_loss) if mtp_loss < 700 else float("inf"),
        )
    arrays: dict[str, np.ndarray] = {}
    if keep_logits and is_reporter():
        arrays["logits"] = torch.cat(kept["logits"]).numpy()
        if mtp_layers:
            arrays["mtp_logits"] = torch.cat(kept["mtp_logits"]).numpy()
    return metrics, arrays


def save_npz_atomic(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` to ``path`` (.npz) through a temporary file and a rename."""
    return atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)
