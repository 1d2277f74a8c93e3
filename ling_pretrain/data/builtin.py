"""The built-in corpus: the running Python's standard library, tokenized by a BPE trained on it.

It exists so that training, tests and examples have real text without downloading anything.
Every source file of the standard library becomes one JSONL document; a byte-level BPE
tokenizer is trained on a deterministic subset of them (``<|endoftext|>`` is both eos and
pad, as in Ling); the whole JSONL is then pretokenized into one indexed dataset. Nothing is
held out: the trainer splits documents itself.

The build is deterministic and idempotent: a stamp file records what was built from what,
and a later call whose stamp matches returns at once without writing anything, so every
rank of a job may call :func:`ensure_builtin_corpus` after rank 0 has built it.

This is the one training-side module that imports the pretokenizer
(:mod:`ling_pretrain.data.pretokenize`), because building the built-in corpus *is* a
pretokenize run; everything else that reads training data goes through the reader
:mod:`ling_pretrain.data.indexed` only, and the pretokenizer never imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.data.indexed import index_size
from ling_pretrain.data.pretokenize import PretokenizeOptions, pretokenize

logger = logging.getLogger(__name__)

CACHE_ENV = "LING_PRETRAIN_CACHE"
"""Environment variable that replaces the cache root ``~/.cache/ling_pretrain``."""
EOD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
TRAIN_BYTES = 8 * 2**20
"""At most about this much text trains the tokenizer (all of it is tokenized)."""
PREFIX_NAME = "stdlib_text_document"
JSONL_NAME = "stdlib.jsonl"
TOKENIZER_NAME = "tokenizer"
STAMP_NAME = "builtin.json"
STAMP_VERSION = 1
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Directories under the standard library that are not part of the corpus."""


def default_cache_dir() -> Path:
    """The cache root: ``$LING_PRETRAIN_CACHE`` or ``~/.cache/ling_pretrain``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ling_pretrain"


def builtin_paths(out_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """Where the built-in corpus lives (built or not).

    Args:
        out_dir: Corpus directory; None means ``<cache root>/builtin``.

    Returns:
        (indexed dataset prefix, tokenizer directory).
    """
    directory = Path(out_dir) if out_dir is not None else default_cache_dir() / "builtin"
    directory = directory.expanduser().absolute()
    return str(directory / PREFIX_NAME), str(directory / TOKENIZER_NAME)


def stdlib_dir() -> Path:
    """The source directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``*.py`` files under ``root`` (default: the standard library), sorted.

    Third-party packages and caches are left out.
    """
    base = Path(root) if root is not None else stdlib_dir()
    found = []
    for directory, subdirs, names in os.walk(base):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def iter_documents(root: str | os.PathLike | None = None) -> Iterator[dict[str, str]]:
    """``{"text", "path"}`` per standard-library source file, in sorted path order.

    Files that are not valid UTF-8 (a few deliberately broken test inputs) are left out.
    """
    base = Path(root) if root is not None else stdlib_dir()
    for path in stdlib_sources(base):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            logger.debug("not UTF-8, left out: %s", path)
            continue
        yield {"text": text, "path": path.relative_to(base).as_posix()}


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | os.PathLike) -> str:
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face tokenizer directory.

    ``<|endoftext|>`` is the only special token and is both eos and pad (Ling's convention).

    Returns:
        The tokenizer directory.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "pad_token": EOD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
    }
    special = {"eos_token": EOD_TOKEN, "pad_token": EOD_TOKEN}
    atomic_write_text(out / "tokenizer.json", tokenizer.to_str())
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    return str(out)


def _training_subset(texts: list[str], budget: int) -> list[str]:
    """Every k-th document, k chosen so that about ``budget`` characters remain."""
    total = sum(len(t) for t in texts)
    stride = max(1, math.ceil(total / budget))
    return texts[::stride]


def _source_fingerprint(root: Path, vocab_size: int) -> str:
    material = [STAMP_VERSION, sys.version, str(root), vocab_size, TRAIN_BYTES]
    for path in stdlib_sources(root):
        stat = path.stat()
        material.append([path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()


def _is_built(directory: Path, fingerprint: str) -> bool:
    stamp = directory / STAMP_NAME
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        prefix = directory / PREFIX_NAME
        return (
            recorded.get("fingerprint") == fingerprint
            and os.path.getsize(f"{prefix}.idx") == index_size(recorded["documents"])
            and os.path.getsize(f"{prefix}.bin") == recorded["bin_bytes"]
            and (directory / TOKENIZER_NAME / "tokenizer.json").is_file()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    import fcntl

    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_builtin_corpus(
    out_dir: str | os.PathLike | None = None,
    *,
    stdlib_root: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[str, str]:
    """Build the built-in corpus unless an identical build is already there.

    Args:
        out_dir: Corpus directory; None means ``<cache root>/builtin``.
        stdlib_root: Source tree to use instead of the standard library (tests).
        vocab_size: Tokenizer vocabulary size.
        workers: Tokenizer processes; None uses up to 4 of the available cores.
        progress: Show a progress bar while tokenizing.

    Returns:
        (indexed dataset prefix, tokenizer directory).
    """
    prefix, tokenizer_dir = builtin_paths(out_dir)
    directory = Path(prefix).parent
    root = Path(stdlib_root).absolute() if stdlib_root is not None else stdlib_dir()
    fingerprint = _source_fingerprint(root, vocab_size)
    if _is_built(directory, fingerprint):
        return prefix, tokenizer_dir
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        if _is_built(directory, fingerprint):
            return prefix, tokenizer_dir
        logger.info("building the built-in corpus from %s in %s", root, directory)
        (directory / STAMP_NAME).unlink(missing_ok=True)
        documents = list(iter_documents(root))
        if not documents:
            raise FileNotFoundError(f"no UTF-8 *.py files found under {root}")
        jsonl = directory / JSONL_NAME
        # Empty source files (many __init__.py) have nothing to tokenize; left out here,
        # they are not counted as skipped records. The tokenizer still trains on the
        # evenly spaced subset of all files, as it always has.
        atomic_write_text(jsonl, "".join(json.dumps(d) + "\n" for d in documents if d["text"]))
        texts = [d["text"] for d in documents]
        train_tokenizer(_training_subset(texts, TRAIN_BYTES), vocab_size, tokenizer_dir)
        if workers is None:
            workers = min(4, _available_cpus())
        summary = pretokenize(
            PretokenizeOptions(
                inputs=[str(jsonl)],
                tokenizer_dir=tokenizer_dir,
                output_prefix=prefix,
                workers=workers,
                progress=progress,
            )
        )
        if summary.prefixes != [prefix]:
            raise RuntimeError(f"expected one dataset at {prefix}, got {summary.prefixes}")
        bin_bytes = os.path.getsize(f"{prefix}.bin")
        stamp = {
            "fingerprint": fingerprint,
            "stdlib_root": str(root),
            "vocab_size": vocab_size,
            "documents": summary.documents,
            "tokens": summary.tokens,
            "bin_bytes": bin_bytes,
        }
        atomic_write_text(directory / STAMP_NAME, json.dumps(stamp, indent=2) + "\n")
        logger.info("built-in corpus: %d documents, %d tokens", summary.documents, summary.tokens)
    return prefix, tokenizer_dir
