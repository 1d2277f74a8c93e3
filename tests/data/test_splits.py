"""A corpus too small for a split is refused before any work; a split nobody reads is never
built (megatron's sample index loops forever on a split without tokens)."""

from __future__ import annotations

import numpy as np
import pytest

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.data.checks import split_bounds
from ling_pretrain.data.indexed import read_document_tokens
from ling_pretrain.jobs.validate import validate
from tests.conftest import read_metrics, run_pretrain


def _corpus(prefix, documents: int, length: int = 40) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(documents):
        builder.add_document(
            torch.from_numpy(rng.integers(1, 8000, length).astype(np.int32)), [length]
        )
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize(
    "split", ["99,1,0", "98,2,0", "98/2/0", "90,5,5", "1", "80,20", "0.7,0.2,0.1"]
)
def test_split_bounds_are_megatrons(split):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    expected = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    assert split_bounds(split) == expected  # exactly: document indices are rounded from these


def test_document_tokens_are_read_from_the_index(tmp_path):
    prefix = _corpus(str(tmp_path / "c"), 5, length=7)
    assert read_document_tokens(prefix) == [7] * 5


def _cfg(prefix, *overrides):
    return compose(
        [
            "+model=ling_tiny",
            "data=indexed",
            f"data.prefixes=[{prefix}]",
            "data.eod_token_id=0",
            "data.seq_length=32",
            *overrides,
        ]
    )


def test_a_needed_split_without_documents_is_refused_naming_the_counts(tmp_path):
    prefix = _corpus(str(tmp_path / "c"), 20)
    with pytest.raises(ConfigError) as err:
        validate(_cfg(prefix, "trainer.eval_interval=5"), 1)
    message = str(err.value)
    assert "gives the validation split 0 of the 20 documents" in message
    assert "trainer.eval_interval=0" in message and "data.split" in message
    validate(_cfg(prefix, "trainer.eval_interval=5", "data.split=90/10/0"), 1)
    with pytest.raises(ConfigError, match="gives the validation split no documents"):
        validate(_cfg(prefix, "trainer.eval_interval=5", "data.split=100/0/0"), 1)
    validate(_cfg(prefix, "trainer.eval_interval=0"), 1)  # validation is not read


def test_a_small_corpus_trains_when_nothing_reads_its_empty_split(tmp_path):
    """20 documents at the default split 99,1,0 leave validation empty; without evaluation
    the run must not build it (it hung forever before)."""
    prefix = _corpus(str(tmp_path / "c"), 20)
    out = tmp_path / "run"
    run_pretrain(
        out,
        [
            "+model=ling_tiny",
            "data=indexed",
            f"data.prefixes=[{prefix}]",
            "data.eod_token_id=0",
            "data.seq_length=32",
            "data.num_workers=0",
            "trainer.max_steps=2",
            "trainer.eval_interval=0",
            "trainer.params_dtype=fp32",
            "checkpoint.save_at_end=false",
        ],
        timeout=120,
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
