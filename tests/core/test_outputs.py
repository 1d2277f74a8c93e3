"""Output directories: a command never deletes or overwrites what it did not write."""

from __future__ import annotations

import pytest

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.outputs import (
    MANIFEST,
    claim_dir,
    claim_file,
    prepare_staging,
    publish,
    read_manifest,
)


def _write_output(path, kind, files, overwrite=False):
    claim = claim_dir(path, kind, overwrite=overwrite)
    staging = prepare_staging(claim)
    for name, text in files.items():
        (staging / name).write_text(text)
    return publish(claim)


def test_new_and_empty_directories_are_claimed_and_get_a_manifest(tmp_path):
    out = _write_output(tmp_path / "new", "export", {"a.bin": "1", "index.json": "{}"})
    assert read_manifest(out) == {"kind": "export", "files": ["a.bin", "index.json"]}
    (tmp_path / "empty").mkdir()
    _write_output(tmp_path / "empty", "export", {"a.bin": "1"})
    assert not (tmp_path / "new.partial").exists() and not (tmp_path / "new.old").exists()


def test_a_directory_of_other_files_is_refused_naming_them_and_left_alone(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"not empty .*it holds \.git/, notes\.txt"):
            claim_dir(repo, "export", overwrite=overwrite)
    assert (repo / "notes.txt").read_text() == "mine" and (repo / ".git" / "HEAD").is_file()
    # an output of another kind is not ours to replace either
    other = _write_output(tmp_path / "other", "conversion", {"x": "1"})
    with pytest.raises(ConfigError, match="not a previous export"):
        claim_dir(other, "export", overwrite=True)


def test_overwrite_replaces_only_what_the_previous_output_wrote(tmp_path):
    out = _write_output(tmp_path / "hf", "export", {"old-1.bin": "a", "old-2.bin": "b", "c": "1"})
    with pytest.raises(
        ConfigError, match=r"holds a previous export \(3 files\)\. Pass --overwrite"
    ):
        claim_dir(out, "export")
    (out / "README.md").write_text("my notes")
    (out / "extra").mkdir()
    (out / "extra" / "f").write_text("kept too")
    _write_output(out, "export", {"new-1.bin": "n", "c": "2"}, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([MANIFEST, "README.md", "c", "extra", "new-1.bin"])
    assert (out / "README.md").read_text() == "my notes" and (out / "c").read_text() == "2"
    assert (out / "extra" / "f").read_text() == "kept too"
    assert read_manifest(out)["files"] == ["c", "new-1.bin"]


def test_a_kept_file_that_the_new_output_would_overwrite_stops_before_any_change(tmp_path):
    out = _write_output(tmp_path / "hf", "export", {"a": "1"})
    (out / "tokenizer.json").write_text("user's")
    claim = claim_dir(out, "export", overwrite=True)
    staging = prepare_staging(claim)
    (staging / "tokenizer.json").write_text("ours")
    with pytest.raises(ConfigError, match="holds tokenizer.json"):
        publish(claim)
    assert (out / "tokenizer.json").read_text() == "user's" and (out / "a").read_text() == "1"


def test_files_are_claimed_only_when_absent_or_ours(tmp_path):
    theirs = tmp_path / "theirs.json"
    theirs.write_text("{}")
    with pytest.raises(ConfigError, match="was not written by this command"):
        claim_file(theirs, "--output", lambda p: False)
    assert claim_file(theirs, "--output", lambda p: True) == theirs
    with pytest.raises(ConfigError, match="is a directory"):
        claim_file(tmp_path, "--output", lambda p: True)
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        claim_dir(theirs, "export")
