"""A user's path: pretokenize a corpus in two job-array parts, then train on the output prefix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ling_pretrain.data.builtin import train_tokenizer
from tests.conftest import REPO, read_metrics, run_pretrain, subprocess_env

pytestmark = pytest.mark.distributed


def test_pretokenized_parts_train_as_one_dataset(tmp_path):
    texts = [
        f"def function_{i}(x):\n    return x * {i} + {i % 7}  # document {i}\n" * (1 + i % 5)
        for i in range(400)
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = train_tokenizer(texts, 1024, tmp_path / "tokenizer")
    prefix = tmp_path / "tok" / "corpus_text_document"
    for part in range(2):
        subprocess.run(
            [
                sys.executable,
                "data_tools/pretokenize.py",
                "--input",
                str(corpus),
                "--tokenizer",
                str(tokenizer),
                "--output-prefix",
                str(prefix),
                "--num-shards",
                "2",
                "--shard-index",
                str(part),
                "--no-progress",
            ],
            cwd=REPO,
            env=subprocess_env(),
            check=True,
            capture_output=True,
            text=True,
        )
    assert not (tmp_path / "tok" / "corpus_text_document.bin").exists()  # only parts exist

    out = tmp_path / "run"
    run_pretrain(
        out,
        [
            "+model=ling_tiny",
            "data=indexed",
            f"data.prefixes=[{prefix}]",
            f"data.tokenizer={tokenizer}",
            "data.seq_length=64",
            "data.num_workers=0",
            "data.split='100,0,0'",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4",
            "trainer.max_steps=12",
        ],
    )
    records = read_metrics(out)
    assert len(records) == 12
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
