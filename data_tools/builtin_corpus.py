"""Build the built-in training corpus from the Python standard library (nothing downloaded).

Run from the repository root::

    python data_tools/builtin_corpus.py                 # into ~/.cache/ling_pretrain/builtin
    python data_tools/builtin_corpus.py --out-dir /tmp/builtin --vocab-size 16384

``LING_PRETRAIN_CACHE`` replaces the cache root ``~/.cache/ling_pretrain``. A second run with
the same Python and options finds the corpus already built and returns at once. The dataset
prefix and the tokenizer directory are printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ling_pretrain.data.builtin import DEFAULT_VOCAB_SIZE, ensure_builtin_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="corpus directory")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes")
    parser.add_argument(
        "--stdlib-root", default=None, help="source tree to use instead of the standard library"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prefix, tokenizer_dir = ensure_builtin_corpus(
        args.out_dir,
        stdlib_root=args.stdlib_root,
        vocab_size=args.vocab_size,
        workers=args.workers,
        progress=True,
    )
    print(f"prefix: {prefix}")
    print(f"tokenizer: {tokenizer_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
