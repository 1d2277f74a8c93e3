"""Atomic writes: the destination holds the old file or the whole new one, never a part."""

from __future__ import annotations

import os

import pytest

from ling_pretrain.core.io import atomic_open, atomic_write_text, temporary_path


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "old ✓\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert path.read_text(encoding="utf-8") == "old ✓\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_streaming_write_commits_under_another_name(tmp_path):
    handle = atomic_open(tmp_path / "draft.bin", "wb", sync_dir=True)
    assert handle.tmp == temporary_path(tmp_path / "draft.bin")
    assert handle.tmp.name == f"draft.bin.tmp{os.getpid()}"
    for chunk in (b"ab", b"cd"):
        handle.file.write(chunk)
    assert not (tmp_path / "draft.bin").exists()
    assert handle.commit(tmp_path / "final.bin") == tmp_path / "final.bin"
    assert (tmp_path / "final.bin").read_bytes() == b"abcd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.bin"]


def test_failed_rename_removes_temporary(tmp_path, monkeypatch):
    handle = atomic_open(tmp_path / "a.bin", "wb")
    handle.file.write(b"data")

    def refuse(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk gone"):
        handle.commit()
    assert list(tmp_path.iterdir()) == []


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        atomic_open(tmp_path / "a", "a")
