"""Pretokenization: output format, determinism, bad input, crash safety, resume, input kinds."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ling_pretrain.data import pretokenize as pt
from ling_pretrain.data.builtin import train_tokenizer
from ling_pretrain.data.indexed import ManifestError, collect_prefixes
from ling_pretrain.data.pretokenize import PretokenizeError, PretokenizeOptions, pretokenize
from ling_pretrain.data.pretokenize.encode import encode_in_order
from ling_pretrain.data.pretokenize.readers import Batch
from ling_pretrain.data.pretokenize.writer import ShardWriter

REPO = Path(__file__).resolve().parents[2]
EOD = "<|endoftext|>"

DOCS = [
    "def main():\n    return 42\n",
    "Héllo wörld — ünïcode ✓ 数据 🚀",
    "line one\nline two\n\n\ttabbed",
    "x" * 3000,
    "The end-of-document string <|endoftext|> inside a text stays text.",
    " leading space and trailing space ",
] + [f"document number {i} with some words {i * 7}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A small byte-level BPE with <|endoftext|> as eos and pad."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    sources = sorted(Path(pt.__file__).parent.glob("*.py"))
    corpus = DOCS * 3 + [p.read_text() for p in sources]
    return train_tokenizer(corpus, vocab_size=400, out_dir=out)


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory) -> str:
    """A word-level tokenizer with 70,000 ids, too many for uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, EOD: 1}
    vocab.update({f"w{i}": i + 2 for i in range(69_998)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("bigtok")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": EOD}}))
    return str(out)


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def options(inputs, tokenizer_dir, prefix, **kw) -> PretokenizeOptions:
    kw.setdefault("progress", False)
    return PretokenizeOptions(
        inputs=[str(p) for p in inputs],
        tokenizer_dir=tokenizer_dir,
        output_prefix=str(prefix),
        **kw,
    )


def read_docs(prefix) -> list[list[int]]:
    """Documents as megatron-core's own reader sees them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def read_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def encode(tokenizer_dir: str, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # special-token strings in text stay text
    return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def eod_id(tokenizer_dir: str) -> int:
    return pt.load_tokenizer_info(tokenizer_dir).eod_id


def all_tokens(prefixes) -> list[list[int]]:
    return [doc for prefix in prefixes for doc in read_docs(prefix)]


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_bytes_equal_megatron_builder(tmp_path, tokenizer_dir, dtype):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    summary = pretokenize(
        options(
            [write_jsonl(tmp_path / "a.jsonl", DOCS)], tokenizer_dir, tmp_path / "ours", dtype=dtype
        )
    )
    assert summary.dtype == dtype
    eod = eod_id(tokenizer_dir)
    builder = IndexedDatasetBuilder(str(tmp_path / "mcore.bin"), dtype=getattr(np, dtype))
    for ids in encode(tokenizer_dir, DOCS):
        tokens = torch.tensor(ids + [eod])
        builder.add_document(tokens, [len(tokens)])
    builder.finalize(str(tmp_path / "mcore.idx"))
    assert read_bytes(tmp_path / "ours") == read_bytes(tmp_path / "mcore")


def test_round_trip_equals_tokenizer_output(tmp_path, tokenizer_dir):
    prefix = tmp_path / "out"
    summary = pretokenize(options([write_jsonl(tmp_path / "a.jsonl", DOCS)], tokenizer_dir, prefix))
    eod = eod_id(tokenizer_dir)
    docs = read_docs(prefix)
    expected = [ids + [eod] for ids in encode(tokenizer_dir, DOCS)]
    assert docs == expected
    assert summary.documents == len(DOCS)
    assert summary.tokens == sum(map(len, expected))
    assert summary.prefixes == [str(prefix)]
    # The literal "<|endoftext|>" in DOCS[4] is text: the only eod is the appended one.
    assert docs[4].count(eod) == 1 and docs[4][-1] == eod
    on_disk = json.loads(Path(f"{prefix}.summary.json").read_text())
    assert on_disk["documents"] == len(DOCS) and on_disk["tokens_per_sec"] > 0


def test_allow_special_tokens_maps_literal_eod(tmp_path, tokenizer_dir):
    prefix = tmp_path / "out"
    pretokenize(
        options(
            [write_jsonl(tmp_path / "a.jsonl", DOCS[4:5])],
            tokenizer_dir,
            prefix,
            allow_special_tokens=True,
        )
    )
    assert read_docs(prefix)[0].count(eod_id(tokenizer_dir)) == 2


def test_worker_count_does_not_change_bytes(tmp_path, tokenizer_dir):
    inputs = [
        write_jsonl(tmp_path / "a.jsonl", DOCS),
        write_jsonl(tmp_path / "b.jsonl", DOCS[::-1]),
        write_jsonl(tmp_path / "c.jsonl", [d.upper() for d in DOCS]),
    ]
    kw = {"batch_bytes": 700, "batch_records": 5}
    one = pretokenize(options(inputs, tokenizer_dir, tmp_path / "w1", workers=1, **kw))
    two = pretokenize(options(inputs, tokenizer_dir, tmp_path / "w2", workers=2, **kw))
    assert one.documents == two.documents == 3 * len(DOCS)
    assert read_bytes(tmp_path / "w1") == read_bytes(tmp_path / "w2")


# --------------------------------------------------------------------------- bad input

GOOD = json.dumps({"text": "good document"}).encode()
BAD_LINES = {
    "malformed_json": b'{"text": "unterminated',
    "missing_key": json.dumps({"body": "no text key"}).encode(),
    "non_string": json.dumps({"text": 17}).encode(),
    "empty": json.dumps({"text": ""}).encode(),
    "invalid_utf8": b'{"text": "bad \xff\xfe bytes"}',
    "not_object": b'["a", "list"]',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_skip_counts_with_location(tmp_path, tokenizer_dir, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([GOOD, GOOD, BAD_LINES[reason], GOOD]) + b"\n")
    summary = pretokenize(
        options([path], tokenizer_dir, tmp_path / "out", on_error="skip", max_bad_fraction=1)
    )
    assert summary.documents == 3
    assert summary.skipped == {reason: 1}
    assert summary.skipped_examples[0]["where"] == f"{path}:3"
    assert len(read_docs(tmp_path / "out")) == 3


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_fail_names_file_and_line(tmp_path, tokenizer_dir, reason):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([GOOD, BAD_LINES[reason], GOOD]) + b"\n")
    with pytest.raises(PretokenizeError, match=f"{path}:2: {pt.SKIP_REASONS[reason]}"):
        pretokenize(options([path], tokenizer_dir, tmp_path / "out", on_error="fail"))
    assert not (tmp_path / "out.idx").exists()


def test_unpaired_surrogate_is_invalid_utf8(tmp_path, tokenizer_dir):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
    summary = pretokenize(options([path], tokenizer_dir, tmp_path / "out", max_bad_fraction=1))
    assert summary.skipped == {"invalid_utf8": 1}
    assert summary.skipped_examples[0]["where"] == f"{path}:2"
    assert read_docs(tmp_path / "out") == [
        ids + [eod_id(tokenizer_dir)] for ids in encode(tokenizer_dir, ["ok", "fine"])
    ]


def test_bad_text_file_reports_line(tmp_path, tokenizer_dir):
    directory = tmp_path / "texts"
    directory.mkdir()
    (directory / "a.txt").write_text("fine text")
    (directory / "b.txt").write_bytes(b"line 1\nline 2 \xff\n")
    (directory / "c.txt").write_bytes(b"")
    summary = pretokenize(options([directory], tokenizer_dir, tmp_path / "out", max_bad_fraction=1))
    assert summary.documents == 1
    assert summary.skipped == {"empty": 1, "invalid_utf8": 1}
    where = {e["reason"]: e["where"] for e in summary.skipped_examples}
    assert where == {"invalid_utf8": f"{directory / 'b.txt'}:2", "empty": str(directory / "c.txt")}


# --------------------------------------------------------------------------- user errors


def test_user_errors_are_clear_and_early(tmp_path, tokenizer_dir):
    good = write_jsonl(tmp_path / "a.jsonl", DOCS)
    out = tmp_path / "never" / "out"
    with pytest.raises(PretokenizeError, match="input path not found"):
        pretokenize(options([tmp_path / "missing.jsonl"], tokenizer_dir, out))
    with pytest.raises(PretokenizeError, match="tokenizer directory not found"):
        pretokenize(options([good], str(tmp_path / "no_tokenizer"), out))
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_text(Path(tokenizer_dir, "tokenizer.json").read_text())
    with pytest.raises(PretokenizeError, match="--eod-token"):
        pretokenize(options([good], str(no_eos), out))
    with pytest.raises(PretokenizeError, match="not in the vocabulary"):
        pretokenize(options([good], tokenizer_dir, out, eod_token="<|nope|>"))
    assert not out.parent.exists()
    summary = pretokenize(options([good], str(no_eos), tmp_path / "ok", eod_token=EOD))
    assert summary.eod_id == eod_id(tokenizer_dir)


def test_dtype_refused_when_vocabulary_does_not_fit(tmp_path, big_vocab_dir):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "w69997 w5 w65536 unknown"}) + "\n")
    with pytest.raises(PretokenizeError, match="do not fit in uint16"):
        pretokenize(options([path], big_vocab_dir, tmp_path / "u16", dtype="uint16"))
    summary = pretokenize(options([path], big_vocab_dir, tmp_path / "auto"))
    assert summary.dtype == "int32"
    assert read_docs(tmp_path / "auto") == [[69999, 7, 65538, 0, 1]]


# --------------------------------------------------------------------------- crash and resume


def test_crash_leaves_no_valid_index_and_rerun_matches_clean_run(
    tmp_path, tokenizer_dir, monkeypatch
):
    inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS)]
    kw = {"max_shard_bytes": 200, "batch_records": 4}
    clean = pretokenize(options(inputs, tokenizer_dir, tmp_path / "clean" / "p", **kw))
    assert len(clean.prefixes) >= 4

    original = ShardWriter.write

    def crashing_write(self, tokens, lengths):
        if self.tmp_prefix.endswith("_00002"):
            original(self, tokens[: len(tokens) // 2], lengths[:1])
            self.bin.file.flush()
            raise KeyboardInterrupt("killed")
        original(self, tokens, lengths)

    # A hard kill runs no clean-up: leave the temporary files behind as it would.
    monkeypatch.setattr(ShardWriter, "write", crashing_write)
    monkeypatch.setattr(ShardWriter, "abort", lambda self: None)
    prefix = tmp_path / "crash" / "p"
    with pytest.raises(KeyboardInterrupt):
        pretokenize(options(inputs, tokenizer_dir, prefix, **kw))
    assert Path(f"{prefix}_00001.idx").exists()
    (partial,) = prefix.parent.glob("p_00002.bin.tmp*")
    assert partial.stat().st_size > 0
    assert not Path(f"{prefix}_00002.idx").exists()
    assert not Path(f"{prefix}_00002.bin").exists()
    manifest = json.loads(Path(f"{prefix}.manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["shards"]) == 2

    monkeypatch.undo()
    resumed = pretokenize(options(inputs, tokenizer_dir, prefix, **kw))
    assert resumed.shards_reused == 2
    assert resumed.shards_written == len(clean.prefixes) - 2
    assert resumed.documents == clean.documents and resumed.tokens == clean.tokens
    for ours, reference in zip(resumed.prefixes, clean.prefixes, strict=True):
        assert Path(ours).name == Path(reference).name
        assert read_bytes(ours) == read_bytes(reference)
    assert not list(prefix.parent.glob("*.tmp*"))


def test_crash_while_replacing_old_output_never_pairs_new_bin_with_old_idx(
    tmp_path, tokenizer_dir, monkeypatch
):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    prefix = tmp_path / "p"
    pretokenize(options([path], tokenizer_dir, prefix))
    # Without its manifest the old output is not known to be ours, so it is not deleted up
    # front; publishing the new shard must still drop the old index before the new .bin lands.
    Path(f"{prefix}.manifest.json").unlink()
    write_jsonl(path, DOCS[:5])
    real_replace = os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt("killed between renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_idx)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(options([path], tokenizer_dir, prefix))
    assert not Path(f"{prefix}.idx").exists()
    assert len(Path(f"{prefix}.bin").read_bytes()) < 1000  # the new, 5-document data


def test_rerun_skips_finished_shards_and_redoes_changed_input(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    kw = {"max_shard_bytes": 300}
    first = pretokenize(options([path], tokenizer_dir, tmp_path / "p", **kw))
    assert first.shards_written == len(first.prefixes) > 1
    stamps = [os.stat(f"{p}.bin").st_mtime_ns for p in first.prefixes]

    again = pretokenize(options([path], tokenizer_dir, tmp_path / "p", **kw))
    assert again.shards_written == 0 and again.shards_reused == len(first.prefixes)
    assert again.documents == first.documents and again.prefixes == first.prefixes
    assert [os.stat(f"{p}.bin").st_mtime_ns for p in first.prefixes] == stamps

    write_jsonl(path, DOCS[:3])
    changed = pretokenize(options([path], tokenizer_dir, tmp_path / "p", **kw))
    assert changed.shards_written == len(changed.prefixes) and changed.documents == 3
    fresh = pretokenize(options([path], tokenizer_dir, tmp_path / "fresh", **kw))
    assert all_tokens(changed.prefixes) == all_tokens(fresh.prefixes)
    stale = set(first.prefixes) - set(changed.prefixes)
    assert stale and not any(Path(f"{p}.idx").exists() for p in stale)


# --------------------------------------------------------------------------- sharding


def test_size_limited_shards_concatenate_to_single_output(tmp_path, tokenizer_dir):
    inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS)]
    single = pretokenize(options(inputs, tokenizer_dir, tmp_path / "one"))
    limit = 256
    sharded = pretokenize(options(inputs, tokenizer_dir, tmp_path / "many", max_shard_bytes=limit))
    names = [Path(p).name for p in sharded.prefixes]
    assert names == [f"many_{i:05d}" for i in range(len(names))] and len(names) > 2
    assert all_tokens(sharded.prefixes) == read_docs(tmp_path / "one")
    for prefix in sharded.prefixes:
        size = os.path.getsize(f"{prefix}.bin")
        assert size <= limit or len(read_docs(prefix)) == 1
    assert collect_prefixes(str(tmp_path / "many")) == sharded.prefixes
    assert single.tokens == sharded.tokens


def test_task_parts_cover_the_input_in_order(tmp_path, tokenizer_dir):
    lines = [f"part document {i} " + "word " * (i % 13) for i in range(300)]
    lines[250] = ""  # an empty document, far into the file
    big = write_jsonl(tmp_path / "big.jsonl", lines)
    small = write_jsonl(tmp_path / "small.jsonl", DOCS)
    inputs = [big, small]
    kw = {"input_split_bytes": 2048, "max_bad_fraction": 1}
    whole = pretokenize(options(inputs, tokenizer_dir, tmp_path / "whole", **kw))
    parts = []
    for index in range(3):
        summary = pretokenize(
            options(inputs, tokenizer_dir, tmp_path / "job", num_shards=3, shard_index=index, **kw)
        )
        assert summary.documents > 0
        parts.append(summary)
    assert [Path(s.output_prefix).name for s in parts] == [
        f"job.part{i:05d}-of-00003" for i in range(3)
    ]
    assert sum(s.documents for s in parts) == whole.documents
    prefixes = collect_prefixes(str(tmp_path / "job"))
    assert prefixes == [p for s in parts for p in s.prefixes]
    assert all_tokens(prefixes) == read_docs(tmp_path / "whole")
    # The empty document is reported at its true line even inside a later piece of the file.
    examples = [e for s in parts for e in s.skipped_examples]
    assert examples == [{"where": f"{big}:251", "reason": "empty", "detail": ""}]


def test_collect_prefixes_refuses_missing_part(tmp_path, tokenizer_dir):
    inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS)]
    pretokenize(options(inputs, tokenizer_dir, tmp_path / "job", num_shards=2, shard_index=0))
    with pytest.raises(ManifestError, match=r"parts \[1\]"):
        collect_prefixes(str(tmp_path / "job"))


# --------------------------------------------------------------------------- input kinds


def test_every_input_kind_gives_the_same_tokens(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = DOCS[:12]
    reference = pretokenize(
        options([write_jsonl(tmp_path / "ref.jsonl", docs)], tokenizer_dir, tmp_path / "ref")
    )
    expected = read_docs(tmp_path / "ref")
    payload = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()

    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(payload))
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(payload))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), parquet, row_group_size=5)
    texts = tmp_path / "texts"
    for i, d in enumerate(docs):
        sub = texts / f"group{i // 5}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(d)
    (texts / "group0" / "ignored.bin").write_bytes(b"\x00\x01")

    from datasets import Dataset, DatasetDict

    hf_dataset = tmp_path / "hf_dataset"
    Dataset.from_dict({"text": docs}).save_to_disk(str(hf_dataset))
    hf_dict = tmp_path / "hf_dict"
    DatasetDict(
        {
            "train": Dataset.from_dict({"text": docs[:7]}),
            "test": Dataset.from_dict({"text": docs[7:]}),
        }
    ).save_to_disk(str(hf_dict))

    for name, source in [
        ("gz", gz),
        ("zst", zst),
        ("parquet", parquet),
        ("textdir", texts),
        ("hf", hf_dataset),
        ("hfdict", hf_dict),
    ]:
        summary = pretokenize(options([source], tokenizer_dir, tmp_path / name, batch_records=4))
        assert read_docs(tmp_path / name) == expected, name
        assert summary.tokens == reference.tokens, name


def test_parquet_rows_are_located_and_missing_column_counted(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d", "", "f"]}), parquet, row_group_size=2)
    summary = pretokenize(options([parquet], tokenizer_dir, tmp_path / "p", max_bad_fraction=1))
    assert summary.documents == 4
    assert [e["where"] for e in summary.skipped_examples] == [f"{parquet}:3", f"{parquet}:5"]
    other = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["x", "y"]}), other)
    summary = pretokenize(options([other], tokenizer_dir, tmp_path / "q", max_bad_fraction=1))
    assert summary.documents == 0 and summary.skipped == {"missing_key": 2}
    assert summary.prefixes == [] and not (tmp_path / "q.idx").exists()


# --------------------------------------------------------------------------- command line


def test_command_line_prints_summary_and_reports_user_errors(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    script = str(REPO / "data_tools" / "pretokenize.py")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, script, "--input", str(path), "--tokenizer", tokenizer_dir]
    done = subprocess.run(
        [
            *cmd,
            "--output-prefix",
            str(tmp_path / "cli"),
            "--workers",
            "2",
            "--max-shard-bytes",
            "0.5K",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["documents"] == len(DOCS) and len(summary["prefixes"]) > 1
    assert (
        json.loads(Path(f"{tmp_path / 'cli'}.summary.json").read_text())["tokens"]
        == summary["tokens"]
    )
    failed = subprocess.run(
        [*cmd[:3], str(tmp_path / "nope.jsonl"), *cmd[4:], "--output-prefix", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert failed.returncode == 2 and "input path not found" in failed.stderr
    listed = subprocess.run(
        [sys.executable, script, "--list-prefixes", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert json.loads(listed.stdout) == summary["prefixes"]


def test_dead_worker_raises_instead_of_hanging(tmp_path):
    batch = Batch("jsonl", b'{"text": "a"}\n', [(0, 0, 1)], 14)
    init_args = (str(tmp_path / "missing" / "tokenizer.json"), 0, "uint16", "text", False)
    with pytest.raises(RuntimeError, match="worker process died"):
        list(encode_in_order([batch, batch, batch], 2, init_args))
