"""launch/evaluate.py refuses what it cannot evaluate, naming the cause, before any model work."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.eval.evaluate import check_tokens, load_token_file, make_batches
from tests.conftest import REPO, subprocess_env

EVALUATE = REPO / "launch" / "evaluate.py"


def _fails(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(EVALUATE), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    return proc.stderr


def test_missing_checkpoint_is_named(tmp_path):
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.zeros((1, 8), dtype=np.int32))
    err = _fails(["--checkpoint", str(tmp_path / "nope"), "--tokens", str(tokens)])
    assert "nope: no such file or directory" in err


def test_directory_that_is_no_checkpoint_is_named(tmp_path):
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.zeros((1, 8), dtype=np.int32))
    err = _fails(["--checkpoint", str(tmp_path), "--tokens", str(tokens)])
    assert "neither a Hugging Face directory" in err and "metadata.json" in err


def test_token_ids_outside_the_vocabulary_are_refused_before_loading(seed_checkpoint, tmp_path):
    tokens = tmp_path / "t.npy"
    ids = np.zeros((2, 16), dtype=np.int32)
    ids[1, 5] = 8192  # ling_tiny's vocabulary is [0, 8192)
    np.save(tokens, ids)
    err = _fails(["--checkpoint", str(seed_checkpoint), "--tokens", str(tokens)])
    assert "token id 8192 at [1, 5]" in err and "[0, 8192)" in err
    assert "loading" not in err  # refused before the model was built


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 8), dtype=np.float32), "must be integers"),
        (np.zeros((2, 2, 8), dtype=np.int32), "expected a 2-d array"),
        (np.zeros((2, 2), dtype=np.int32), "at least one sequence of 3"),
        (np.zeros((1, 300), dtype=np.int64), "exceed model.max_position_embeddings=256"),
        (np.full((1, 8), -1, dtype=np.int64), "token id -1"),
    ],
)
def test_bad_token_arrays_are_refused(array, message):
    with pytest.raises(ConfigError, match=message):
        check_tokens(array, "--tokens x.npy", vocab_size=512, max_positions=256)


def test_token_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_token_file(str(tmp_path / "missing.npy"), None)
    bad = tmp_path / "bad.npy"
    bad.write_text("not an array")
    with pytest.raises(ConfigError, match="not a .npy array"):
        load_token_file(str(bad), None)
    stream = tmp_path / "stream.npy"
    np.save(stream, np.arange(70, dtype=np.int32))
    rows = load_token_file(str(stream), 16)
    assert rows.shape == (4, 16) and rows[1, 0] == 16


def test_batches_score_the_next_token():
    tokens = np.arange(12, dtype=np.int32).reshape(3, 4)
    batches = make_batches(tokens, batch_size=2, num_batches=None)
    assert len(batches) == 1  # the third row does not fill a batch
    b = batches[0]
    assert b["labels"].tolist() == [[1, 2, 3, 0], [5, 6, 7, 0]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    with pytest.raises(ConfigError, match="do not fill one batch"):
        make_batches(tokens, batch_size=4, num_batches=None)


def test_indexed_data_is_read_as_consecutive_rows(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from ling_pretrain.eval.evaluate import load_indexed_tokens

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in (np.arange(0, 5), np.arange(5, 9), np.arange(9, 30)):
        builder.add_document(torch.from_numpy(doc.astype(np.int32)), [len(doc)])
    builder.finalize(prefix + ".idx")
    rows = load_indexed_tokens(prefix, rows=3, seq_length=6)
    assert rows.tolist() == np.arange(18).reshape(3, 6).tolist()
    with pytest.raises(ConfigError, match="holds 30 tokens, fewer than"):
        load_indexed_tokens(prefix, rows=4, seq_length=10)
    with pytest.raises(ConfigError, match="does not exist"):
        load_indexed_tokens(str(tmp_path / "other"), rows=1, seq_length=4)


def test_an_existing_file_it_did_not_write_is_not_overwritten(seed_checkpoint, tmp_path):
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.zeros((1, 8), dtype=np.int32))
    mine = tmp_path / "results.json"
    mine.write_text('{"my": "numbers"}')
    args = ["--checkpoint", str(seed_checkpoint), "--tokens", str(tokens), "--output", str(mine)]
    err = _fails(args)
    assert "--output" in err and "was not written by this command" in err
    assert mine.read_text() == '{"my": "numbers"}'
    logits = tmp_path / "logits.npz"
    logits.write_text("not an npz of ours")
    err = _fails([*args[:4], "--output", str(tmp_path / "new.json"), "--save-logits", str(logits)])
    assert "--save-logits" in err and logits.read_text() == "not an npz of ours"
