"""Training data: megatron-core GPTDataset blends behind a step-indexed sampler.

End-of-document and padding are decided here, explicitly:

* Documents are packed back to back, separated by the end-of-document token, so samples are
  never padded. The tokenizer adaptor given to megatron therefore has *no* pad token:
  megatron's GPTDataset zeroes every input token and masks every label equal to the pad id,
  and Ling's ``<|endoftext|>`` is both eos and pad, so passing it as pad would erase every
  document boundary from inputs and loss (an upstream pitfall).
* ``data.eod_mask_loss`` (off by default) removes from the loss the positions whose *input*
  is the end-of-document token, i.e. predicting the first token of the next, unrelated
  document. Predicting the end-of-document token itself is always trained.

Sample order depends only on the seed and the number of samples consumed, so a resumed run
sees exactly the samples an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ling_pretrain.data.indexed import ManifestError, collect_prefixes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EodTokenizer:
    """The tokenizer interface megatron's GPTDataset needs: vocabulary size and eod only."""

    vocab_size: int
    eod: int

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """Part of megatron's dataset cache key: samples depend on the eod id."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


def eod_token_id_from_tokenizer_dir(tokenizer_dir: str) -> int:
    """The end-of-document (eos) token id of an HF tokenizer directory.

    Raises:
        ValueError: when the directory has no tokenizer.json or names no eos token.
    """
    path = Path(tokenizer_dir)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"data.tokenizer={tokenizer_dir!r} has no tokenizer.json")
    eos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        meta = path / name
        if meta.is_file():
            value = json.loads(meta.read_text()).get("eos_token")
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                eos = value
                break
    if eos is None:
        raise ValueError(
            f"tokenizer {tokenizer_dir!r} names no eos_token in tokenizer_config.json or "
            "special_tokens_map.json; set data.eod_token_id explicitly"
        )
    from tokenizers import Tokenizer

    token_id = Tokenizer.from_file(str(tok_file)).token_to_id(eos)
    if token_id is None:
        raise ValueError(f"eos token {eos!r} of {tokenizer_dir!r} is not in its vocabulary")
    return token_id


def expand_prefix(prefix: str) -> list[str]:
    """Dataset prefixes behind one ``data.prefixes`` entry.

    An entry is either a megatron dataset prefix (``P.bin``/``P.idx`` exist) or an output
    prefix of ``data_tools/pretokenize.py``, whose shards (and, for runs split into a Slurm
    job array, every part's shards) are listed by its manifests, in order.

    Raises:
        ValueError: naming the entry, when neither exists or a part is missing or unfinished.
    """
    if os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"):
        return [prefix]
    try:
        return collect_prefixes(prefix)
    except ManifestError as err:
        raise ValueError(
            f"data.prefixes entry {prefix!r}: no {prefix}.bin/.idx and no pretokenize manifest "
            f"({err}). Give a dataset prefix (path without .bin/.idx) or the --output-prefix of "
            "a finished data_tools/pretokenize.py run."
        ) from None


def expand_blend(
    prefixes: list[str], weights: list[float] | None
) -> tuple[list[str], list[float] | None]:
    """Expand every entry to its dataset prefixes; an entry's weight is split by shard size."""
    out_prefixes: list[str] = []
    out_weights: list[float] = []
    for i, entry in enumerate(prefixes):
        shards = expand_prefix(entry)
        out_prefixes += shards
        if weights is not None:
            sizes = [os.path.getsize(s + ".bin") for s in shards]
            total = sum(sizes) or 1
            out_weights += [weights[i] * size / total for size in sizes]
    return out_prefixes, (out_weights if weights is not None else None)


@dataclass(frozen=True)
class ResolvedData:
    """Data settings after resolving the built-in corpus and the tokenizer."""

    source: str
    prefixes: list[str]
    weights: list[float] | None
    eod_token_id: int


def resolve_data(cfg: Any) -> ResolvedData:
    """Resolve ``cfg.data`` to prefixes and an eod id, building the built-in corpus if needed.

    Must be called on every rank after the process group exists (rank 0 builds the built-in
    corpus; the others wait for it).
    """
    import torch.distributed as dist

    d = cfg.data
    prefixes, tokenizer = list(d.prefixes), d.tokenizer
    if d.source == "builtin":
        from ling_pretrain.data.builtin import ensure_builtin_corpus

        if not dist.is_initialized() or dist.get_rank() == 0:
            ensure_builtin_corpus()
        if dist.is_initialized():
            dist.barrier()
        prefix, tokenizer = ensure_builtin_corpus()
        prefixes = [str(prefix)]
    weights = list(d.weights) if d.weights is not None else None
    if d.source == "indexed":
        prefixes, weights = expand_blend(prefixes, weights)
    if d.source == "mock":
        eod = d.eod_token_id if d.eod_token_id is not None else cfg.model.vocab_size - 1
    elif d.eod_token_id is not None:
        eod = d.eod_token_id
    else:
        eod = eod_token_id_from_tokenizer_dir(str(tokenizer))
    if not 0 <= eod < cfg.model.vocab_size:
        raise ValueError(
            f"end-of-document id {eod} is outside model.vocab_size={cfg.model.vocab_size}: the "
            "data and the model use different tokenizers"
        )
    return ResolvedData(d.source, prefixes, weights, eod)


def build_datasets(cfg: Any, data: ResolvedData, num_samples: tuple[int, int, int], cache_dir: str):
    """Train/validation/test GPT datasets (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    d = cfg.data
    mock = data.source == "mock"
    config = GPTDatasetConfig(
        random_seed=cfg.trainer.seed,
        sequence_length=d.seq_length,
        blend=None if mock else (data.prefixes, data.weights),
        split=d.split,
        path_to_cache=cache_dir,
        tokenizer=EodTokenizer(vocab_size=cfg.model.vocab_size, eod=data.eod_token_id),
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    if mock:
        config.mock = True
    # Build only the splits the run reads (training; validation when asked for samples): an
    # unneeded split may hold no tokens, and megatron's sample index then never finishes.
    # The split bounds of the others are unchanged, so they keep the same documents.
    for i, samples in enumerate(num_samples):
        if i > 0 and not samples:
            config.split_matrix[i] = None
    cls = MockGPTDataset if mock else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()


class StepSampler(torch.utils.data.Sampler):
    """Yields this data-parallel rank's micro-batches of sample indices, from a start sample.

    Global sample ``s`` of the stream belongs to data-parallel rank ``(s // mbs) % dp``, so the
    stream is the same for every layout with the same global batch size.
    """

    def __init__(
        self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ):
        self.total, self.consumed = total, consumed
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp_size))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += step


def make_loader(dataset, consumed: int, cfg: Any, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """An endless-enough iterator of micro-batches for one rank starting at ``consumed``."""
    sampler = StepSampler(len(dataset), consumed, cfg.trainer.micro_batch_size, dp_rank, dp_size)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return iter(loader)


def data_cache_dir(cfg: Any) -> str:
    """Where megatron's sample-index cache lives for this run."""
    path = cfg.data.cache_dir or os.path.join(cfg.run.output_dir, "data_cache")
    os.makedirs(path, exist_ok=True)
    return path
