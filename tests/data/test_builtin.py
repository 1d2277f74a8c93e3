"""The built-in corpus builder, on a small fake standard library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ling_pretrain.data import builtin

REPO = Path(__file__).resolve().parents[2]
EOD = "<|endoftext|>"

SOURCES = {
    "abc.py": "class ABC:\n    '''Abstract base.'''\n",
    "json/__init__.py": "from .decoder import JSONDecoder\n\n__all__ = ['JSONDecoder']\n",
    "json/decoder.py": "class JSONDecoder:\n    def decode(self, s):\n        return s  # é ✓\n",
    "os.py": "import sys\n\ndef fspath(p):\n    return str(p)\n" * 20,
    "zipfile/_path.py": "def joinpath(a, b):\n    return a + '/' + b\n",
}
LEFT_OUT = {
    "site-packages/thirdparty.py": "print('not stdlib')\n",
    "__pycache__/abc.cpython-311.py": "cached = True\n",
    "README.txt": "not python\n",
}


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    root = tmp_path / "stdlib"
    for name, text in {**SOURCES, **LEFT_OUT}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "test" / "bad_coding.py").parent.mkdir()
    (root / "test" / "bad_coding.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    return root


def read_docs(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_builds_corpus_and_tokenizer(tmp_path, fake_stdlib):
    from tokenizers import Tokenizer

    prefix, tokenizer_dir = builtin.ensure_builtin_corpus(
        tmp_path / "out", stdlib_root=fake_stdlib, vocab_size=300, workers=1
    )
    assert (prefix, tokenizer_dir) == builtin.builtin_paths(tmp_path / "out")
    config = json.loads(Path(tokenizer_dir, "tokenizer_config.json").read_text())
    special = json.loads(Path(tokenizer_dir, "special_tokens_map.json").read_text())
    assert config["eos_token"] == config["pad_token"] == EOD
    assert special["eos_token"] == special["pad_token"] == EOD
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir, "tokenizer.json")))
    eod = tokenizer.token_to_id(EOD)
    assert eod is not None and tokenizer.get_vocab_size() == 300

    lines = Path(prefix).with_name(builtin.JSONL_NAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == sorted(SOURCES)
    docs = read_docs(prefix)
    assert len(docs) == len(SOURCES)
    for doc, name in zip(docs, sorted(SOURCES), strict=True):
        assert doc[-1] == eod and eod not in doc[:-1]
        assert tokenizer.decode(doc[:-1]) == SOURCES[name]


def test_second_call_is_a_read_only_no_op_and_changes_rebuild(tmp_path, fake_stdlib):
    kw = {"stdlib_root": fake_stdlib, "vocab_size": 300, "workers": 1}
    prefix, _ = builtin.ensure_builtin_corpus(tmp_path / "out", **kw)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    builtin.ensure_builtin_corpus(tmp_path / "out", **kw)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before

    (fake_stdlib / "new_module.py").write_text("def added():\n    pass\n")
    builtin.ensure_builtin_corpus(tmp_path / "out", **kw)
    assert len(read_docs(prefix)) == len(SOURCES) + 1


def test_build_is_deterministic(tmp_path, fake_stdlib):
    kw = {"stdlib_root": fake_stdlib, "vocab_size": 300}
    first = builtin.ensure_builtin_corpus(tmp_path / "a", workers=1, **kw)
    second = builtin.ensure_builtin_corpus(tmp_path / "b", workers=2, **kw)
    for one, two in zip(first, second, strict=True):
        assert one != two
    assert (
        Path(first[1], "tokenizer.json").read_bytes()
        == Path(second[1], "tokenizer.json").read_bytes()
    )
    for suffix in (".bin", ".idx"):
        assert Path(first[0] + suffix).read_bytes() == Path(second[0] + suffix).read_bytes()


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "cache"))
    prefix, tokenizer_dir = builtin.builtin_paths()
    assert prefix == str(tmp_path / "cache" / "builtin" / "stdlib_text_document")
    assert tokenizer_dir == str(tmp_path / "cache" / "builtin" / "tokenizer")
    monkeypatch.delenv(builtin.CACHE_ENV)
    assert builtin.builtin_paths()[0].startswith(str(Path.home() / ".cache" / "ling_pretrain"))


def test_real_stdlib_listing_skips_third_party_packages():
    sources = builtin.stdlib_sources()
    names = {p.relative_to(builtin.stdlib_dir()).as_posix() for p in sources}
    assert {"os.py", "json/decoder.py"} <= names
    assert not any("site-packages" in n or "__pycache__" in n for n in names)
    assert sources == sorted(sources, key=lambda p: p.relative_to(builtin.stdlib_dir()).as_posix())


def test_command_line_prints_prefix_and_tokenizer(tmp_path, fake_stdlib):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        str(REPO / "data_tools" / "builtin_corpus.py"),
        "--out-dir",
        str(tmp_path / "cli"),
        "--stdlib-root",
        str(fake_stdlib),
        "--vocab-size",
        "300",
        "--workers",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    prefix, tokenizer_dir = builtin.builtin_paths(tmp_path / "cli")
    assert done.stdout.splitlines()[-2:] == [f"prefix: {prefix}", f"tokenizer: {tokenizer_dir}"]
    assert Path(prefix + ".idx").is_file()
