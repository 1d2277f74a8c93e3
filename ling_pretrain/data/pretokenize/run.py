"""One pretokenization run: from the options to finished shards, a manifest and a summary.

The main process reads (:mod:`.readers`), hands batches to the tokenizer workers
(:mod:`.encode`), writes their results in input order into size-limited shards
(:mod:`.writer`) and records every finished shard in the manifest (:mod:`.manifest`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.data.indexed import manifest_path, read_manifest
from ling_pretrain.data.pretokenize.encode import (
    SKIP_REASONS,
    TokenizerInfo,
    choose_dtype,
    encode_in_order,
    load_tokenizer_info,
)
from ling_pretrain.data.pretokenize.inputs import (
    Locator,
    choose_split_bytes,
    discover_inputs,
    plan_units,
    select_units,
)
from ling_pretrain.data.pretokenize.manifest import (
    SUMMARY_SUFFIX,
    ShardRecord,
    finished_shards,
    remove_outputs,
    remove_temporary_files,
    run_fingerprint,
    write_manifest,
)
from ling_pretrain.data.pretokenize.options import (
    PretokenizeError,
    PretokenizeOptions,
    validate_options,
)
from ling_pretrain.data.pretokenize.readers import Batch, merge_batches, read_unit
from ling_pretrain.data.pretokenize.writer import ShardWriter

logger = logging.getLogger(__name__)


@dataclass
class PretokenizeSummary:
    """The outcome of a run; ``to_dict`` is what is printed and written to ``.summary.json``."""

    output_prefix: str
    prefixes: list[str]
    documents: int
    tokens: int
    dtype: str
    eod_id: int
    bytes_read: int
    skipped: dict[str, int]
    skipped_examples: list[dict[str, str]]
    seconds: float
    tokens_this_run: int
    shards_reused: int
    shards_written: int
    workers: int
    first_batch_seconds: float | None
    """From the call to the first tokenized batch: the fixed start-up cost."""

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def skipped_fraction(self) -> float:
        """Skipped records over all records (documents plus skipped records)."""
        records = self.documents + self.skipped_total
        return self.skipped_total / records if records else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skipped_total"] = self.skipped_total
        out["skipped_fraction"] = round(self.skipped_fraction, 6)
        out["tokens_per_sec"] = round(self.tokens_per_sec, 1)
        out["mb_per_sec"] = round(self.bytes_read / 1e6 / self.seconds, 3) if self.seconds else 0.0
        out["seconds"] = round(self.seconds, 3)
        if self.first_batch_seconds is not None:
            out["first_batch_seconds"] = round(self.first_batch_seconds, 3)
        return out


class _Progress:
    """The progress bar on stderr: documents, tokens/s, MB/s and skipped records."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.start = time.perf_counter()
        self.last = 0.0
        self.state = (0, 0, 0)
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit="doc", unit_scale=True, dynamic_ncols=True, desc="pretokenize")

    def update(self, documents: int, tokens: int, nbytes: int, skipped: int) -> None:
        if self.bar is None:
            return
        self.bar.update(documents)
        self.state = (tokens, nbytes, skipped)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self._postfix(now)

    def _postfix(self, now: float) -> None:
        tokens, nbytes, skipped = self.state
        elapsed = max(now - self.start, 1e-9)
        text = f"{tokens / elapsed / 1e6:.2f}M tok/s, {nbytes / elapsed / 1e6:.1f} MB/s"
        if skipped:
            text += f", {skipped} skipped"
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self._postfix(time.perf_counter())
            self.bar.close()


class _Run:
    """State of one pretokenization run: the open shard and the finished ones."""

    def __init__(
        self,
        options: PretokenizeOptions,
        prefix: str,
        dtype: str,
        fingerprint: str,
        eod_id: int,
        locator: Locator,
        reused: list[ShardRecord],
    ) -> None:
        self.options = options
        self.prefix = prefix
        self.dtype = dtype
        self.itemsize = np.dtype(dtype).itemsize
        self.fingerprint = fingerprint
        self.eod_id = eod_id
        self.locate = locator
        self.shards = list(reused)
        self.writer: ShardWriter | None = None
        self.shard_tokens = 0
        self.skipped: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []
        self.pending_errors: list[tuple[tuple[int, int], str, str, str]] = []
        self.end: tuple[int, int] = (0, 0)
        self.tokens_this_run = 0
        self.skipped_seen = sum(n for s in self.shards for n in s.skipped.values())
        """Skipped records so far, those of the reused shards included (for the progress)."""

    def _open(self) -> ShardWriter:
        if self.writer is None:
            self.writer = ShardWriter(f"{self.prefix}_{len(self.shards):05d}", self.dtype)
        return self.writer

    def _take_errors(self, before: tuple[int, int] | None) -> None:
        keep = []
        for position, reason, location, detail in self.pending_errors:
            if before is None or position < before:
                self.skipped[reason] += 1
                if len(self.examples) < 10:
                    self.examples.append({"where": location, "reason": reason, "detail": detail})
            else:
                keep.append((position, reason, location, detail))
        self.pending_errors = keep

    def consume(self, batch: Batch, result: tuple) -> int:
        """Write one batch's documents, closing shards at the size limit; returns the tokens."""
        tokens, lengths, kept, errors = result
        for offset, reason, detail, line in errors:
            unit, record = batch.position(offset)
            location = self.locate(unit, record, line)
            if self.options.on_error == "fail":
                raise PretokenizeError(
                    f"{location}: {SKIP_REASONS[reason]} ({detail or reason}); fix the input or "
                    "pass --on-error skip to count and skip such records"
                )
            self.pending_errors.append(((unit, record), reason, location, detail))
        self.skipped_seen += len(errors)
        limit = self.options.max_shard_bytes
        byte_ends = np.cumsum(lengths.astype(np.int64)) * self.itemsize
        first = 0
        token_start = 0
        while first < len(lengths):
            written = self._open().bin_bytes
            done = byte_ends[first - 1] if first else 0
            last = first + int(
                np.searchsorted(byte_ends[first:] - done, limit - written, side="right")
            )
            if last == first and self.writer.documents == 0:
                last = first + 1
            if last > first:
                token_end = token_start + int((byte_ends[last - 1] - done) // self.itemsize)
                self.writer.write(tokens[token_start:token_end], lengths[first:last])
                self.shard_tokens += token_end - token_start
                self.end = batch.position(int(kept[last - 1]) + 1)
                token_start = token_end
                first = last
            if first < len(lengths):
                self._close(final=False)
        self.tokens_this_run += len(tokens)
        if len(lengths):
            self._take_errors(self.end)
        return len(tokens)

    def _close(self, final: bool) -> None:
        writer = self.writer
        assert writer is not None
        self._take_errors(None if final else self.end)
        index = len(self.shards)
        name = self.prefix if final and index == 0 else f"{self.prefix}_{index:05d}"
        writer.finish(name)
        record = ShardRecord(
            name,
            writer.documents,
            self.shard_tokens,
            writer.bin_bytes,
            self.end,
            dict(self.skipped),
            self.examples,
        )
        self.shards.append(record)
        logger.info("wrote %s (%d documents, %d tokens)", name, record.documents, record.tokens)
        write_manifest(
            self.prefix, self.fingerprint, self.dtype, self.eod_id, self.shards, complete=False
        )
        self.writer = None
        self.shard_tokens = 0
        self.skipped = Counter()
        self.examples = []

    def finish(self) -> None:
        """Publish the last shard and mark the manifest complete, unless too many records
        were skipped: then the last shard is dropped, the manifest stays unfinished with the
        reason, and :class:`PretokenizeError` explains what to do."""
        self._take_errors(None)
        skipped = Counter(self.skipped)
        examples = []
        documents = self.writer.documents if self.writer is not None else 0
        for shard in self.shards:
            skipped.update(shard.skipped)
            examples.extend(shard.examples)
            documents += shard.documents
        examples.extend(self.examples)
        bad = skipped.total()
        records = documents + bad
        limit = self.options.max_bad_fraction
        if records and bad / records > limit:
            self.abort()
            reason = (
                f"{bad} of {records} records skipped ({_percent(bad / records)}), more than "
                f"max_bad_fraction={limit}"
            )
            write_manifest(
                self.prefix,
                self.fingerprint,
                self.dtype,
                self.eod_id,
                self.shards,
                complete=False,
                failed=reason,
            )
            raise PretokenizeError(
                _too_many_bad_records(self.prefix, skipped, examples, records, limit, self.shards)
            )
        if self.writer is not None:
            self._close(final=True)
        write_manifest(
            self.prefix, self.fingerprint, self.dtype, self.eod_id, self.shards, complete=True
        )

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _check_writable(directory: str) -> None:
    """Create the output directory and check that files can be created in it.

    Raises:
        PretokenizeError: naming the directory and the cause.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise PretokenizeError(
            f"cannot write to {directory!r}: it is a file, not a directory; choose another "
            "--output-prefix"
        )
    try:
        os.makedirs(directory, exist_ok=True)
        # An unnamed file: the check leaves nothing behind, whatever happens.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise PretokenizeError(
            f"cannot write to {directory!r} ({exc.strerror or exc}); choose another "
            "--output-prefix or fix the directory's permissions"
        ) from None


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _skipped_report(
    skipped: dict[str, int], examples: list[dict[str, str]], records: int, first: int = 5
) -> str:
    """``N of M records (x%) were skipped: counts by reason; first at file:line (why), ...``."""
    total = sum(skipped.values())
    counts = ", ".join(
        f"{n} {SKIP_REASONS.get(r, r)}" for r, n in sorted(skipped.items(), key=lambda i: -i[1])
    )
    where = ", ".join(
        f"{e['where']} ({SKIP_REASONS.get(e['reason'], e['reason'])}"
        + (f": {e['detail']}" if e.get("detail") else "")
        + ")"
        for e in examples[:first]
    )
    more = ", ..." if total > min(first, len(examples)) else ""
    return (
        f"{total} of {records} records ({_percent(total / records)}) were skipped: {counts}; "
        f"first at {where}{more}"
    )


def _too_many_bad_records(
    prefix: str,
    skipped: dict[str, int],
    examples: list[dict[str, str]],
    records: int,
    limit: float,
    kept: list[ShardRecord],
) -> str:
    shards = f"the {len(kept)} finished shard(s) are kept but " if kept else ""
    hint = " (Is --text-key right?)" if skipped.get("missing_key") else ""
    return (
        f"too many bad records for {prefix}: {_skipped_report(skipped, examples, records)}."
        f"{hint} That is more than --max-bad-fraction {limit} ({_percent(limit)}), so the "
        f"output is left unfinished: {shards}the last shard is not written and "
        f"{manifest_path(prefix)} says complete: false, so training and --list-prefixes "
        "refuse it. Clean the data; or raise --max-bad-fraction if dropping these records is "
        "acceptable (rerunning keeps the finished shards); or pass --on-error fail to stop at "
        "the first bad record."
    )


def _skipped_warning(summary: PretokenizeSummary, max_bad_fraction: float) -> str | None:
    """The warning for a finished run that skipped records (None when it skipped none)."""
    if not summary.skipped_total:
        return None
    records = summary.documents + summary.skipped_total
    report = _skipped_report(summary.skipped, summary.skipped_examples, records)
    return (
        f"{summary.output_prefix}: {report} (allowed: up to {_percent(max_bad_fraction)}, "
        f"--max-bad-fraction; {summary.output_prefix}{SUMMARY_SUFFIX} lists the first 20 "
        "under skipped_examples)"
    )


def pretokenize(options: PretokenizeOptions) -> PretokenizeSummary:
    """Tokenize the inputs into megatron-core indexed dataset shards.

    Writes ``<prefix>.bin/.idx`` (one shard) or ``<prefix>_NNNNN.bin/.idx`` (several), with
    ``<prefix>`` the output prefix or, with ``num_shards > 1``, its part
    ``<output_prefix>.partIIIII-of-KKKKK``; plus ``<prefix>.manifest.json`` and
    ``<prefix>.summary.json``. Finished shards of an earlier run with the same inputs,
    tokenizer and options are kept.

    Args:
        options: What to tokenize and how.

    Returns:
        The run's summary.

    Raises:
        PretokenizeError: for user errors (paths, tokenizer, options) before any work, for
            the first bad record when ``on_error == "fail"``, and at the end when more than
            ``max_bad_fraction`` of the records were skipped.
    """
    started = time.perf_counter()
    validate_options(options)
    info = load_tokenizer_info(options.tokenizer_dir, options.eod_token)
    dtype = choose_dtype(info.cardinality, options.dtype)
    files = discover_inputs(options.inputs, options.text_suffixes)
    split_bytes = choose_split_bytes(files, options.num_shards, options.input_split_bytes)
    units = plan_units(files, split_bytes)
    selected = select_units(units, options.num_shards, options.shard_index)
    fingerprint = run_fingerprint(options, files, info, dtype, split_bytes)

    prefix = os.path.abspath(options.run_prefix)
    directory = os.path.dirname(prefix)
    _check_writable(directory)
    manifest = read_manifest(prefix)
    reused: list[ShardRecord] = []
    if manifest is not None and manifest.get("fingerprint") == fingerprint:
        reused = finished_shards(directory, manifest)
        if manifest.get("complete") and len(reused) == len(manifest.get("shards", [])):
            logger.info("%s is up to date; nothing to do", prefix)
            summary = _summarize(
                options, prefix, reused, info, dtype, seconds=time.perf_counter() - started
            )
            if warning := _skipped_warning(summary, options.max_bad_fraction):
                logger.warning("%s", warning)
            return summary
        if reused:
            logger.info("resuming %s after %d finished shards", prefix, len(reused))
    elif manifest is not None:
        logger.info("inputs, tokenizer or options changed since %s was written; redoing it", prefix)
        remove_outputs(prefix, manifest)
    remove_temporary_files(prefix)

    resume_unit, resume_record = reused[-1].end if reused else (0, 0)
    run = _Run(options, prefix, dtype, fingerprint, info.eod_id, Locator(files, units), reused)
    if reused:
        run.end = (resume_unit, resume_record)

    def batches() -> Iterator[Batch]:
        for unit_index in selected:
            if unit_index < resume_unit:
                continue
            skip = resume_record if unit_index == resume_unit else 0
            yield from read_unit(
                files,
                unit_index,
                units[unit_index],
                options.text_key,
                skip,
                options.batch_bytes,
                options.batch_records,
            )

    init_args = (
        info.tokenizer_json,
        info.eod_id,
        dtype,
        options.text_key,
        options.allow_special_tokens,
    )
    progress = _Progress(options.progress)
    bytes_read = 0
    first_batch_seconds = None
    try:
        merged = merge_batches(batches(), options.batch_bytes, options.batch_records)
        for batch, result in encode_in_order(merged, options.workers, init_args):
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - started
            run.consume(batch, result)
            bytes_read += batch.nbytes
            progress.update(len(result[1]), run.tokens_this_run, bytes_read, run.skipped_seen)
        run.finish()
    except OSError as exc:
        # Unreadable inputs are PretokenizeErrors by now: this is the file system under the
        # output (a full disk, a quota, permissions changed during the run).
        run.abort()
        raise PretokenizeError(
            f"pretokenizing {prefix} stopped: {exc}; fix the cause (free space, quota, "
            "permissions), then rerun the same command: it keeps the finished shards and "
            "continues"
        ) from None
    except BaseException:
        run.abort()
        raise
    finally:
        progress.close()
    summary = _summarize(
        options,
        prefix,
        run.shards,
        info,
        dtype,
        seconds=time.perf_counter() - started,
        bytes_read=bytes_read,
        tokens_this_run=run.tokens_this_run,
        unwritten_skips=run.skipped,
        first_batch_seconds=first_batch_seconds,
    )
    if warning := _skipped_warning(summary, options.max_bad_fraction):
        logger.warning("%s", warning)
    if not run.shards:
        logger.warning(
            "no documents were written for %s (every record was skipped or the input is empty)",
            prefix,
        )
    atomic_write_text(
        prefix + SUMMARY_SUFFIX, json.dumps(summary.to_dict(), indent=1) + "\n", sync_dir=True
    )
    return summary


def _summarize(
    options: PretokenizeOptions,
    prefix: str,
    shards: list[ShardRecord],
    info: TokenizerInfo,
    dtype: str,
    *,
    seconds: float,
    bytes_read: int = 0,
    tokens_this_run: int = 0,
    unwritten_skips: dict[str, int] | None = None,
    first_batch_seconds: float | None = None,
) -> PretokenizeSummary:
    """The summary of ``shards`` plus what this run read; ``unwritten_skips`` counts skipped
    records that belong to no shard (nothing was written)."""
    skipped: Counter[str] = Counter(unwritten_skips or {})
    examples: list[dict[str, str]] = []
    for shard in shards:
        skipped.update(shard.skipped)
        examples.extend(shard.examples)
    return PretokenizeSummary(
        output_prefix=prefix,
        prefixes=[s.prefix for s in shards],
        documents=sum(s.documents for s in shards),
        tokens=sum(s.tokens for s in shards),
        dtype=dtype,
        eod_id=info.eod_id,
        bytes_read=bytes_read,
        skipped=dict(sorted(skipped.items())),
        skipped_examples=examples[:20],
        seconds=seconds,
        tokens_this_run=tokens_this_run,
        shards_reused=sum(1 for s in shards if not s.fresh),
        shards_written=sum(1 for s in shards if s.fresh),
        workers=options.workers,
        first_batch_seconds=first_batch_seconds,
    )
