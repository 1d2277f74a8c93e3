"""A checkpoint's manifest: every kind of damage is found and named with its file, each
rank's share adds up to the whole check, and keep_last never deletes the newest intact
checkpoint."""

from __future__ import annotations

import json
import os

import pytest

from ling_pretrain.checkpoint import manifest
from ling_pretrain.checkpoint.dist import FORMAT, STATE_FILE, prune, verify_checkpoint

SIZE = 300_000


def _checkpoint(root, checksums: bool = True, state: dict | None = None):
    """A checkpoint directory shaped like ours, with its manifest."""
    root.mkdir(parents=True)
    (root / "__0_0.distcp").write_bytes(os.urandom(SIZE))
    (root / "__0_1.distcp").write_bytes(os.urandom(SIZE // 3))
    (root / ".metadata").write_bytes(os.urandom(2000))
    (root / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (root / STATE_FILE).write_text(json.dumps(state or {"step": 4, "format": FORMAT}))
    (root / "config.yaml").write_text("model:\n  name: tiny\n")
    (root / "rng").mkdir()
    (root / "rng" / "rank00000.pt").write_bytes(os.urandom(500))
    entries = manifest.describe(manifest.files_in(root), root, checksums)
    manifest.write_manifest(root, entries, checksums)
    return root


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_an_intact_checkpoint_has_no_problem(tmp_path):
    ckpt = _checkpoint(tmp_path / "iter_0000004")
    assert verify_checkpoint(ckpt) == []
    listed = json.loads((ckpt / manifest.MANIFEST).read_text())["files"]
    assert set(listed) == {
        "__0_0.distcp",
        "__0_1.distcp",
        ".metadata",
        "metadata.json",
        STATE_FILE,
        "config.yaml",
        "rng/rank00000.pt",
    }
    assert listed["__0_0.distcp"]["size"] == SIZE and len(listed["__0_0.distcp"]["xxh3_64"]) == 16


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda c: (c / "__0_1.distcp").unlink(), "__0_1.distcp: missing"),
        (lambda c: os.truncate(c / "__0_0.distcp", 1000), "__0_0.distcp: truncated (1000 of"),
        (
            lambda c: _overwrite(c / "__0_0.distcp", 4096, os.urandom(4096)),
            "__0_0.distcp: checksum mismatch (xxh3_64 ",
        ),
        (
            lambda c: (c / "__0_0.distcp").open("ab").write(os.urandom(4096)),
            f"__0_0.distcp: {SIZE + 4096} bytes, {SIZE} were written",
        ),
        (lambda c: _overwrite(c / ".metadata", 0, b"\0" * 16), ".metadata: checksum mismatch"),
        (lambda c: _overwrite(c / STATE_FILE, 0, b"\xff\xfe"), f"{STATE_FILE}: checksum mismatch"),
        (lambda c: (c / "rng" / "rank00000.pt").unlink(), "rng/rank00000.pt: missing"),
        (lambda c: (c / manifest.MANIFEST).unlink(), "manifest.json: missing"),
        (lambda c: (c / manifest.MANIFEST).write_text("{"), "manifest.json: unreadable"),
    ],
    ids=[
        "missing",
        "truncated",
        "garbage",
        "appended",
        "metadata",
        "train_state",
        "rng",
        "no_manifest",
        "bad_manifest",
    ],
)
def test_damage_is_named_with_the_file(tmp_path, damage, expected):
    ckpt = _checkpoint(tmp_path / "iter_0000004")
    damage(ckpt)
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_without_checksums_sizes_and_metadata_are_still_checked(tmp_path):
    ckpt = _checkpoint(tmp_path / "iter_0000004", checksums=False)
    assert "xxh3_64" not in json.loads((ckpt / manifest.MANIFEST).read_text())["files"][STATE_FILE]
    _overwrite(ckpt / "__0_0.distcp", 4096, os.urandom(4096))
    assert verify_checkpoint(ckpt) == []  # what checksums are for
    size = (ckpt / STATE_FILE).stat().st_size
    (ckpt / STATE_FILE).write_text("{" + " " * (size - 1))
    os.truncate(ckpt / "__0_1.distcp", 10)
    problems = verify_checkpoint(ckpt)
    assert problems[0].startswith("__0_1.distcp: truncated (10 of")
    assert problems[1].startswith(f"{STATE_FILE}: unreadable (JSONDecodeError")
    assert len(problems) == 2


def test_the_shares_of_all_ranks_make_the_whole_check(tmp_path):
    ckpt = _checkpoint(tmp_path / "iter_0000004")
    for name in ("__0_0.distcp", "__0_1.distcp", "config.yaml"):
        os.truncate(ckpt / name, 1)
    whole = manifest.verify(ckpt)
    shares = [manifest.verify(ckpt, (i, 3)) for i in range(3)]
    assert sorted(p for share in shares for p in share) == sorted(whole)
    assert len(whole) == 3


def test_a_checkpoint_from_before_manifests_loads_unverified(tmp_path, caplog):
    ckpt = _checkpoint(tmp_path / "old", state={"step": 4})
    (ckpt / manifest.MANIFEST).unlink()
    assert verify_checkpoint(ckpt) == []
    assert "loading it unverified" in caplog.text
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 4, "format": FORMAT}))
    assert verify_checkpoint(ckpt) == ["manifest.json: missing"]


def test_keep_last_keeps_the_new_checkpoint_and_never_newer_ones(tmp_path):
    save_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _checkpoint(save_dir / f"iter_{step:07d}")
    (save_dir / "iter_0000010.partial").mkdir()
    # A run that fell back from iter_0000008 (damaged, or left by another trajectory) saves 6.
    deleted = prune(save_dir, save_dir / "iter_0000006", keep_last=2)
    assert [p.name for p in deleted] == ["iter_0000002"]
    assert sorted(p.name for p in save_dir.iterdir()) == [
        "iter_0000004",
        "iter_0000006",
        "iter_0000008",
        "iter_0000010.partial",
    ]
    assert prune(save_dir, save_dir / "iter_0000006", keep_last=1) == [save_dir / "iter_0000004"]
    assert prune(save_dir, save_dir / "iter_0000006", keep_last=0) == []
