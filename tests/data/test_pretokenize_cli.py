"""data_tools/pretokenize.py as a user runs it: bad records, user mistakes, files it must not touch."""

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


# --------------------------------------------------------------------------- bad records


def test_skipped_records_are_named_on_stderr_and_in_the_progress_line(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "in.jsonl", records(3000, {11: '{"text": broken', 2001: "{}"}))
    done = pretokenize_cli(
        "--input", path, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "out",
        "--workers", "2",
        progress=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "2 skipped]" in done.stderr  # the final state of the progress bar
    (warning,) = [line for line in done.stderr.splitlines() if "were skipped" in line]
    assert "2 of 3000 records (0.0667%) were skipped: " in warning
    assert f"{path}:11 (line is not valid JSON: " in warning
    assert f"{path}:2001 (text key is missing: no 'text' key)" in warning
    assert "allowed: up to 0.1%, --max-bad-fraction" in warning
    summary = json.loads(done.stdout)
    assert summary["documents"] == 2998 and summary["skipped_total"] == 2
    assert summary["skipped_fraction"] == round(2 / 3000, 6)
    assert manifest(tmp_path / "out")["complete"] is True


def test_too_many_bad_records_fail_and_leave_the_output_unfinished(tmp_path, tokenizer_dir):
    bad = {5: "not json at all", 17: json.dumps({"text": ""}), 30: json.dumps({"text": 3})}
    path = write_lines(tmp_path / "in.jsonl", records(40, bad))
    prefix = tmp_path / "out" / "p"
    common = ["--input", path, "--tokenizer", tokenizer_dir, "--max-shard-bytes", "300"]
    done = pretokenize_cli(*common, "--output-prefix", prefix)
    assert done.returncode == 2
    message = error_paragraph(done.stderr)
    assert message.startswith(f"error: too many bad records for {prefix}: 3 of 40 records (7.5%)")
    assert f"first at {path}:5 (line is not valid JSON: " in message
    assert f"{path}:17 (document is empty), {path}:30 (text value is not a string: got int)" in (
        message
    )
    assert "more than --max-bad-fraction 0.001 (0.1%)" in message
    for fix in ("Clean the data", "raise --max-bad-fraction", "--on-error fail"):
        assert fix in message
    assert done.stdout == ""

    # Finished shards stay, the last one is not published, and nothing reads it as data.
    written = manifest(prefix)
    assert written["complete"] is False and "more than max_bad_fraction=0.001" in written["failed"]
    kept = [s["prefix"] for s in written["shards"]]
    assert kept and sorted(p.name for p in prefix.parent.glob("*.idx")) == [
        f"{name}.idx" for name in kept
    ]
    assert not (prefix.parent / "p.idx").exists()
    assert not list(prefix.parent.glob("*.tmp*"))
    listed = pretokenize_cli("--list-prefixes", prefix)
    assert listed.returncode == 2 and "its pretokenize run failed" in error_paragraph(listed.stderr)

    # Allowing the skips keeps the finished shards and gives the bytes of a clean run.
    again = pretokenize_cli(*common, "--output-prefix", prefix, "--max-bad-fraction", "0.1")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["shards_reused"] == len(kept) and summary["skipped_total"] == 3
    assert "3 of 40 records (7.5%) were skipped" in again.stderr
    fresh = tmp_path / "fresh" / "p"
    clean = pretokenize_cli(*common, "--output-prefix", fresh, "--max-bad-fraction", "1")
    assert clean.returncode == 0, clean.stderr
    names = [Path(p).name for p in summary["prefixes"]]
    assert names == [Path(p).name for p in json.loads(clean.stdout)["prefixes"]]
    for name in names:
        for suffix in (".bin", ".idx"):
            assert (prefix.parent / (name + suffix)).read_bytes() == (
                fresh.parent / (name + suffix)
            ).read_bytes()


def test_a_wrong_text_key_fails_and_publishes_nothing(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "in.jsonl", records(20, {}))
    prefix = tmp_path / "p"
    args = ["--input", path, "--tokenizer", tokenizer_dir, "--output-prefix", prefix]
    done = pretokenize_cli(*args, "--text-key", "content")
    assert done.returncode == 2
    message = error_paragraph(done.stderr)
    assert "20 of 20 records (100%) were skipped: 20 text key is missing" in message
    assert "(Is --text-key right?)" in message
    assert not (tmp_path / "p.bin").exists() and not (tmp_path / "p.idx").exists()
    stopped = pretokenize_cli(*args, "--on-error", "fail", "--text-key", "content")
    assert stopped.returncode == 2
    assert error_paragraph(stopped.stderr).startswith(f"error: {path}:1: text key is missing")


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
    "bad fraction": (lambda t, tok: {"--max-bad-fraction": "5"}, "between 0 and 1"),
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


# --------------------------------------------------------------------------- other files


def test_reruns_never_delete_files_they_did_not_write(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    prefix = out / "p"
    unrelated = {
        out / name: f"user file {name}"
        for name in (
            "p.txt",
            "p_notes.json",
            "p-other.bin",
            "p-other.idx",
            "p_00000.bin.bak",
            "p_00000.bin.tmp.keep",
            "p_1.bin.tmp",
            "p_00042.bin",
            "pextra_00000.bin",
            "p.summary.json.old",
            "other_00000.bin.tmp123",
        )
    }
    unrelated[tmp_path / "outside.bin"] = "a file beside the output directory"
    for path, text in unrelated.items():
        path.write_text(text)
    path = write_lines(tmp_path / "in.jsonl", records(40, {}))
    args = ["--input", path, "--tokenizer", tokenizer_dir, "--output-prefix", prefix]
    args += ["--max-shard-bytes", "300"]

    first = pretokenize_cli(*args)
    assert first.returncode == 0, first.stderr
    assert len(json.loads(first.stdout)["prefixes"]) > 2
    # A temporary file of ours from a killed run (another process id) is removed on rerun.
    stale = out / "p_00001.bin.tmp4194305"
    stale.write_text("left by a killed run")
    assert pretokenize_cli(*args).returncode == 0  # up to date

    # Changed input: the earlier shards are deleted, from a manifest that also (edited by
    # hand or copied from elsewhere) lists files that are not shards of this prefix.
    edited = manifest(prefix)
    edited["shards"] += [
        {**edited["shards"][0], "prefix": name} for name in ("../outside", "p-other", "p_notes")
    ]
    Path(f"{prefix}.manifest.json").write_text(json.dumps(edited))
    write_lines(path, records(10, {}))
    redo = pretokenize_cli(*args)
    assert redo.returncode == 0, redo.stderr
    assert "is not a shard name of" in redo.stderr
    assert json.loads(redo.stdout)["documents"] == 10
    for path, text in unrelated.items():
        assert path.exists() and path.read_text() == text, path
    assert not stale.exists()
