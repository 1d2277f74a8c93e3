"""Pretokenize JSONL / Parquet / text / Hugging Face datasets into megatron .bin/.idx files.

Run from the repository root::

    python data_tools/pretokenize.py --input data/ --tokenizer /models/Ling-mini-2.0 \\
        --output-prefix /data/tok/web_text_document --workers 16

The JSON summary is printed to stdout and written to ``<prefix>.summary.json``; progress
goes to stderr. Records that cannot be tokenized (bad JSON, no text, ...) are skipped and
reported on stderr with their ``file:line``; the run fails when more than
``--max-bad-fraction`` of the records are skipped. Errors the user can fix exit with status
2 and a one-paragraph message. ``--list-prefixes P`` prints the dataset prefixes written for ``P`` (every
shard of every part), ready for the training config. See docs/data.md for every option,
sharding and resuming.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ling_pretrain.data.indexed import ManifestError, collect_prefixes
from ling_pretrain.data.pretokenize import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_TEXT_SUFFIXES,
    DTYPE_CHOICES,
    ON_ERROR_CHOICES,
    PretokenizeError,
    PretokenizeOptions,
    pretokenize,
)


def _size(text: str) -> int:
    """Parse a byte count such as ``4096``, ``512M`` or ``16G`` (binary units)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", metavar="PATH", help="files or directories")
    parser.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory")
    parser.add_argument("--output-prefix", metavar="P", help="output path prefix")
    parser.add_argument("--text-key", default="text", help="JSON field / column with the text")
    parser.add_argument(
        "--workers", type=int, default=_default_workers(), help="tokenizer processes"
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="skip",
        help="skip: count bad records (see --max-bad-fraction); fail: stop at the first one",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=DEFAULT_MAX_BAD_FRACTION,
        metavar="F",
        help="fail when more than this fraction of the records is skipped "
        f"(default {DEFAULT_MAX_BAD_FRACTION}; 1 never fails)",
    )
    parser.add_argument("--num-shards", type=int, default=1, help="split the input between K jobs")
    parser.add_argument("--shard-index", type=int, default=0, help="which part this job writes")
    parser.add_argument(
        "--max-shard-bytes",
        type=_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="largest .bin per output shard, e.g. 4G (default 16G)",
    )
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    parser.add_argument("--eod-token", default=None, help="end-of-document token string")
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="map special-token strings inside the text to their ids",
    )
    parser.add_argument(
        "--text-suffix",
        action="append",
        dest="text_suffixes",
        default=[],
        help="another suffix read as plain text inside directories, besides .txt (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--list-prefixes",
        metavar="P",
        help="print the dataset prefixes written for output prefix P (all parts) and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_prefixes:
        try:
            print(json.dumps(collect_prefixes(args.list_prefixes), indent=1))
        except ManifestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    missing = [f"--{n}" for n in ("input", "tokenizer", "output_prefix") if not getattr(args, n)]
    if missing:
        parser.error(
            f"the following arguments are required: {', '.join(missing).replace('_', '-')}"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = PretokenizeOptions(
        inputs=args.input,
        tokenizer_dir=args.tokenizer,
        output_prefix=args.output_prefix,
        text_key=args.text_key,
        workers=args.workers,
        on_error=args.on_error,
        max_bad_fraction=args.max_bad_fraction,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        max_shard_bytes=args.max_shard_bytes,
        dtype=args.dtype,
        eod_token=args.eod_token,
        allow_special_tokens=args.allow_special_tokens,
        text_suffixes=(*DEFAULT_TEXT_SUFFIXES, *args.text_suffixes),
        progress=not args.no_progress,
    )
    try:
        summary = pretokenize(options)
    except PretokenizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
