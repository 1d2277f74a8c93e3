"""data_tools/pretokenize.py as a user runs it: user mistakes are messages, not tracebacks."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from ling_pretrain.data.builtin import train_tokenizer
from tests.conftest import REPO, script_cmd, subprocess_env

SCRIPT = REPO / "data_tools" / "pretokenize.py"
TEXTS = [f"document {i}: " + "some words " * (1 + i % 7) for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return train_tokenizer(TEXTS * 2, 300, tmp_path_factory.mktemp("tok") / "tokenizer")


def pretokenize_cli(*args: str | Path, progress: bool = False) -> subprocess.CompletedProcess:
    cmd = script_cmd(SCRIPT, [str(a) for a in args] + ([] if progress else ["--no-progress"]))
    return subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def records(count: int, bad: dict[int, str]) -> list[str]:
    """``count`` JSONL lines, line ``n`` (1-based) replaced by ``bad[n]``."""
    lines = [json.dumps({"text": TEXTS[i % len(TEXTS)]}) for i in range(count)]
    for line, text in bad.items():
        lines[line - 1] = text
    return lines


def error_paragraph(stderr: str) -> str:
    """The ``error:`` message, checked to be one line and the only one, with no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def manifest(prefix: Path) -> dict:
    return json.loads(Path(f"{prefix}.manifest.json").read_text())


# --------------------------------------------------------------------------- user mistakes


def _corrupt_tokenizer(tmp_path: Path, tokenizer_dir: str, name: str, text: str) -> Path:
    broken = tmp_path / "broken_tokenizer"
    broken.mkdir()
    for f in Path(tokenizer_dir).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / name).write_text(text)
    return broken


MISTAKES = {
    "missing input": (lambda t, tok: {"--input": t / "nope.jsonl"}, "input path not found"),
    "missing tokenizer": (
        lambda t, tok: {"--tokenizer": t / "no_tokenizer"},
        "tokenizer directory not found",
    ),
    "tokenizer file as directory": (
        lambda t, tok: {"--tokenizer": Path(tok) / "tokenizer.json"},
        "tokenizer directory not found",
    ),
    "corrupt tokenizer.json": (
        lambda t, tok: {"--tokenizer": _corrupt_tokenizer(t, tok, "tokenizer.json", "{oops")},
        "tokenizer.json: ",
    ),
    "corrupt tokenizer_config.json": (
        lambda t, tok: {
            "--tokenizer": _corrupt_tokenizer(t, tok, "tokenizer_config.json", "{oops")
        },
        "cannot read ",
    ),
    "output under a file": (
        lambda t, tok: {"--output-prefix": write_lines(t / "a_file", ["x"]) / "p"},
        "it is a file, not a directory",
    ),
    "output prefix is a directory": (
        lambda t, tok: {"--output-prefix": f"{t}/out/"},
        "names a directory",
    ),
    "damaged gzip input": (
        lambda t, tok: {"--input": _write_bytes(t / "a.jsonl.gz", b"not gzip")},
        "Not a gzipped file",
    ),
    "truncated gzip input": (
        lambda t, tok: {
            "--input": _write_bytes(t / "a.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 999)[:60])
        },
        "Compressed file ended",
    ),
}


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_user_mistakes_exit_2_with_a_message_and_no_traceback(tmp_path, tokenizer_dir, mistake):
    make, expected = MISTAKES[mistake]
    args = {
        "--input": write_lines(tmp_path / "in.jsonl", records(5, {})),
        "--tokenizer": tokenizer_dir,
        "--output-prefix": tmp_path / "out" / "p",
    }
    args.update(make(tmp_path, tokenizer_dir))
    done = pretokenize_cli(*[x for item in args.items() for x in item])
    assert done.returncode == 2, done.stderr
    assert expected in error_paragraph(done.stderr)
    assert not list(tmp_path.rglob("*.idx"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_output_directory_is_refused(tmp_path, tokenizer_dir):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    path = write_lines(tmp_path / "in.jsonl", records(5, {}))
    done = pretokenize_cli(
        "--input", path, "--tokenizer", tokenizer_dir, "--output-prefix", locked / "p"
    )
    assert done.returncode == 2
    assert f"cannot write to '{locked}'" in error_paragraph(done.stderr)


def test_list_prefixes_of_nothing_is_a_message(tmp_path):
    done = pretokenize_cli("--list-prefixes", tmp_path / "nothing")
    assert done.returncode == 2
    assert "no manifest found" in error_paragraph(done.stderr)
