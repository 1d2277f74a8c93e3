"""Tokenizing: the tokenizer's facts, the per-batch encoder, and the worker pool.

Worker processes (``spawn``ed, one tokenizer thread each) decode, validate and tokenize a
whole batch with ``Tokenizer.encode_batch_fast`` and send back one flat token array per
batch; results come back in input order, never completion order, so the output bytes do not
depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ling_pretrain.data.pretokenize.options import DTYPE_CHOICES, PretokenizeError
from ling_pretrain.data.pretokenize.readers import Batch

SKIP_REASONS = {
    "malformed_json": "line is not valid JSON",
    "not_object": "JSON value is not an object",
    "missing_key": "text key is missing",
    "non_string": "text value is not a string",
    "empty": "document is empty",
    "invalid_utf8": "text is not valid UTF-8",
}
"""Why a record can be skipped, with the cause printed in errors."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What pretokenization needs to know about a tokenizer directory."""

    tokenizer_json: str
    eod_token: str
    eod_id: int
    cardinality: int
    """Largest token id plus one."""
    sha256: str


def _special_token_value(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer_info(tokenizer_dir: str, eod_token: str | None = None) -> TokenizerInfo:
    """Check a tokenizer directory and find its end-of-document token.

    Args:
        tokenizer_dir: Hugging Face tokenizer directory (``tokenizer.json`` inside).
        eod_token: Token string to use as end-of-document; None reads ``eos_token`` from
            ``tokenizer_config.json``, then ``special_tokens_map.json``.

    Returns:
        The tokenizer file, eod token and id, id cardinality and a hash of the tokenizer.

    Raises:
        PretokenizeError: when the directory, tokenizer.json or the eod token is missing, or
            a file cannot be read.
    """
    if not os.path.isdir(tokenizer_dir):
        raise PretokenizeError(
            f"tokenizer directory not found: {tokenizer_dir!r}; pass --tokenizer a Hugging Face "
            "tokenizer directory (one saved with save_pretrained)"
        )
    tokenizer_json = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_json):
        raise PretokenizeError(
            f"{tokenizer_dir!r} has no tokenizer.json; only fast (Rust) Hugging Face tokenizers "
            "are supported: save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
        )
    source = "--eod-token"
    if eod_token is None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            meta = os.path.join(tokenizer_dir, name)
            if os.path.isfile(meta):
                try:
                    with open(meta, encoding="utf-8") as f:
                        config = json.load(f)
                except (OSError, ValueError) as exc:
                    raise PretokenizeError(
                        f"cannot read {meta}: {exc}; repair or remove the file, or save the "
                        "tokenizer again with save_pretrained"
                    ) from None
                value = config.get("eos_token") if isinstance(config, dict) else None
                eod_token = _special_token_value(value)
                if eod_token is not None:
                    source = name
                    break
    if eod_token is None:
        raise PretokenizeError(
            f"no end-of-document token: neither tokenizer_config.json nor "
            f"special_tokens_map.json in {tokenizer_dir!r} names an eos_token; pass the token "
            "string with --eod-token (Ling: --eod-token '<|endoftext|>')"
        )
    from tokenizers import Tokenizer

    try:
        with open(tokenizer_json, "rb") as f:
            raw = f.read()
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise PretokenizeError(
            f"cannot load {tokenizer_json}: {exc}; it must be a Hugging Face tokenizers file, "
            "as written by save_pretrained of a fast tokenizer"
        ) from None
    eod_id = tokenizer.token_to_id(eod_token)
    if eod_id is None:
        raise PretokenizeError(
            f"end-of-document token {eod_token!r} (from {source}) is not in the vocabulary of "
            f"{tokenizer_json}; pass an existing token with --eod-token"
        )
    cardinality = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    digest = hashlib.sha256(raw).hexdigest()
    return TokenizerInfo(tokenizer_json, eod_token, eod_id, cardinality, digest)


def choose_dtype(cardinality: int, requested: str = "auto") -> str:
    """The on-disk token dtype for ids below ``cardinality``.

    ``auto`` follows megatron-core's ``DType.optimal_dtype``: uint16 below 65,500 ids,
    otherwise int32.

    Raises:
        PretokenizeError: when the requested dtype cannot hold every token id.
    """
    if requested not in DTYPE_CHOICES:
        raise PretokenizeError(f"unknown dtype {requested!r}; choose one of {DTYPE_CHOICES}")
    if requested == "auto":
        return "uint16" if cardinality < 65500 else "int32"
    limit = int(np.iinfo(requested).max)
    if cardinality - 1 > limit:
        raise PretokenizeError(
            f"the tokenizer has token ids up to {cardinality - 1}, which do not fit in {requested} "
            f"(largest value {limit}); use --dtype int32 or --dtype auto"
        )
    return requested


class Encoder:
    """Decodes, validates and tokenizes batches; one per worker process."""

    def __init__(
        self, tokenizer_json: str, eod_id: int, dtype: str, text_key: str, allow_special: bool
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.tokenizer.encode_special_tokens = not allow_special
        self.eod_id = eod_id
        self.dtype = np.dtype(dtype)
        self.text_key = text_key

    def __call__(self, kind: str, payload: Any) -> tuple:
        """Tokenize one batch.

        Returns:
            (tokens, lengths, kept record offsets, errors); ``tokens`` holds every kept
            document followed by the end-of-document id, ``lengths`` counts that id, and each
            error is (record offset, reason, detail, line within the record or 0).
        """
        errors: list[tuple[int, str, str, int]] = []
        if kind == "jsonl":
            texts, kept = self._from_jsonl(payload, errors)
        else:
            texts, kept = self._from_values(payload, errors)
        try:
            encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        except Exception:
            texts, kept = self._drop_unencodable(texts, kept, errors)
            encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        errors.sort()
        ids = [e.ids for e in encodings]
        body_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        body = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(body_lengths.sum())
        )
        tokens = np.insert(body, np.cumsum(body_lengths), self.eod_id)
        lengths = (body_lengths + 1).astype(np.int32)
        return tokens, lengths, np.asarray(kept, dtype=np.int64), errors

    def _check_text(self, offset: int, value: Any, errors: list) -> bool:
        if not isinstance(value, str):
            errors.append((offset, "non_string", f"got {type(value).__name__}", 0))
            return False
        if not value:
            errors.append((offset, "empty", "", 0))
            return False
        return True

    def _from_jsonl(self, blob: bytes, errors: list) -> tuple[list[str], list[int]]:
        try:
            lines: list[Any] = blob.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = blob.split(b"\n")
        lines.pop()
        texts, kept = [], []
        key = self.text_key
        for offset, line in enumerate(lines):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    errors.append(
                        (offset, "invalid_utf8", f"invalid byte at column {exc.start + 1}", 0)
                    )
                    continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                if not line.strip():
                    errors.append((offset, "empty", "blank line", 0))
                else:
                    errors.append((offset, "malformed_json", str(exc), 0))
                continue
            if not isinstance(obj, dict):
                errors.append((offset, "not_object", f"got {type(obj).__name__}", 0))
                continue
            if key not in obj:
                errors.append((offset, "missing_key", f"no {key!r} key", 0))
                continue
            if self._check_text(offset, obj[key], errors):
                texts.append(obj[key])
                kept.append(offset)
        return texts, kept

    def _from_values(self, payload: Any, errors: list) -> tuple[list[str], list[int]]:
        if isinstance(payload, int):
            errors.extend(
                (i, "missing_key", f"no {self.text_key!r} column", 0) for i in range(payload)
            )
            return [], []
        values = payload if isinstance(payload, list) else payload.to_pylist()
        texts, kept = [], []
        for offset, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    line = value.count(b"\n", 0, exc.start) + 1
                    errors.append(
                        (offset, "invalid_utf8", f"invalid byte at offset {exc.start}", line)
                    )
                    continue
            if self._check_text(offset, value, errors):
                texts.append(value)
                kept.append(offset)
        return texts, kept

    def _drop_unencodable(
        self, texts: list[str], kept: list[int], errors: list
    ) -> tuple[list[str], list[int]]:
        good_texts, good_kept = [], []
        for text, offset in zip(texts, kept, strict=True):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                errors.append(
                    (offset, "invalid_utf8", f"unpaired surrogate at character {exc.start}", 0)
                )
                continue
            good_texts.append(text)
            good_kept.append(offset)
        return good_texts, good_kept


_WORKER_ENCODER: Encoder | None = None


def _worker_init(*args: Any) -> None:
    # One tokenizer thread per worker process: the processes are the parallelism. The
    # tokenizer's own one-thread pool is measurably faster than TOKENIZERS_PARALLELISM=false,
    # so a false inherited from the caller is overridden too.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(*args)


def _worker_encode(kind: str, payload: Any) -> tuple:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(kind, payload)


def encode_in_order(
    batches: Iterable[Batch], workers: int, init_args: tuple
) -> Iterator[tuple[Batch, tuple]]:
    """Tokenize batches with ``workers`` processes, yielding results in input order."""
    if workers <= 1:
        encoder = Encoder(*init_args)
        for batch in batches:
            yield batch, encoder(batch.kind, batch.payload)
        return
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the caller (e.g. a trainer) may hold threads or a used tokenizer pool.
    # An executor, not multiprocessing.Pool: a worker that dies breaks the executor with an
    # error, where a Pool would silently start a new worker and wait forever for the result.
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=init_args,
    )
    pending: deque[tuple[Batch, Future]] = deque()
    try:
        for batch in batches:
            pending.append((batch, executor.submit(_worker_encode, batch.kind, batch.payload)))
            if len(pending) >= 3 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool as exc:
        raise RuntimeError(
            "a tokenizer worker process died (see its error above; out of memory?)"
        ) from exc
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
