"""Training samples from indexed data: eod/pad masking, blends, and resumable order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.data.gpt import ResolvedData, StepSampler, build_datasets

EOD = 7  # also the pad id, as in Ling (<|endoftext|> is eos and pad)


def _write_prefix(path, docs, vocab=64):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(path) + ".idx")
    return str(path)


def _cfg(tmp_path, **data):
    cfg = compose(["+model=ling_tiny", "data=indexed", "data.prefixes=[x]", "model.vocab_size=64"])
    cfg.data.seq_length = data.pop("seq_length", 16)
    cfg.data.split = "100,0,0"
    for k, v in data.items():
        cfg.data[k] = v
    cfg.run.output_dir = str(tmp_path)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """megatron's blended-dataset cache needs a process group (a world of one here)."""
    import torch.distributed as dist

    from ling_pretrain.runtime.distributed import _free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    yield
    if created:
        dist.destroy_process_group()


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 60, size=int(n))) + [EOD] for n in rng.integers(3, 12, size=80)]
    return _write_prefix(tmp_path / "corpus", docs), docs


def _samples(cfg, prefixes, n, weights=None):
    data = ResolvedData("indexed", prefixes, weights, EOD)
    train, _, _ = build_datasets(cfg, data, (n, 0, 0), str(cfg.run.output_dir))
    return train


def test_pad_equal_to_eos_keeps_every_document_boundary(tmp_path, corpus):
    prefix, docs = corpus
    train = _samples(_cfg(tmp_path), [prefix], 20)
    eods_in = eods_trained = 0
    for i in range(len(train)):
        s = train[i]
        assert torch.equal(s["tokens"][1:], s["labels"][:-1]), "labels are inputs shifted by one"
        eods_in += int((s["tokens"] == EOD).sum())
        eods_trained += int(((s["labels"] == EOD) & (s["loss_mask"] == 1)).sum())
        assert torch.all(s["loss_mask"] == 1), "packed samples have no padding to mask"
    assert eods_in > 0 and eods_trained > 0


def test_eod_mask_loss_masks_positions_after_a_document_end(tmp_path, corpus):
    prefix, _ = corpus
    train = _samples(_cfg(tmp_path, eod_mask_loss=True), [prefix], 20)
    for i in range(len(train)):
        s = train[i]
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == EOD)


def test_samples_are_the_documents_in_order(tmp_path, corpus):
    """Token stream of the samples equals the concatenated documents (shuffled by document)."""
    prefix, docs = corpus
    train = _samples(_cfg(tmp_path), [prefix], 10)
    all_tokens = set(np.concatenate(docs).tolist())
    s = train[0]
    assert set(s["tokens"].tolist()) <= all_tokens


def test_blend_weights_give_the_requested_proportions(tmp_path):
    a = _write_prefix(tmp_path / "a", [[11, 12, 13, EOD]] * 400)
    b = _write_prefix(tmp_path / "b", [[21, 22, 23, EOD]] * 400)
    train = _samples(_cfg(tmp_path, seq_length=8), [a, b], 1000, weights=[0.7, 0.3])
    from_a = sum(int(11 in train[i]["tokens"]) for i in range(len(train)))
    assert len(train) >= 1000
    assert from_a / len(train) == pytest.approx(0.7, abs=0.02)


def test_sample_stream_after_resume_equals_uninterrupted():
    total, mbs, dp, gbs = 200, 2, 2, 8
    for rank in range(dp):
        straight = list(StepSampler(total, 0, mbs, rank, dp))
        consumed = 5 * gbs  # 5 steps done
        resumed = list(StepSampler(total, consumed, mbs, rank, dp))
        assert resumed == straight[consumed // (mbs * dp) :]
    # Every sample is used once per pass, by exactly one rank.
    seen = sorted(
        i for r in range(dp) for batch in StepSampler(total, 0, mbs, r, dp) for i in batch
    )
    assert seen == list(range(total))


def test_each_step_consumes_the_same_samples_whatever_the_data_parallel_size():
    total, gbs = 64, 8
    for mbs, dp in ((8, 1), (2, 2), (1, 4), (2, 4)):
        per_step: list[set] = [set() for _ in range(total // gbs)]
        for rank in range(dp):
            for k, batch in enumerate(StepSampler(total, 0, mbs, rank, dp)):
                per_step[k * mbs * dp // gbs].update(batch)
        assert per_step == [set(range(s * gbs, (s + 1) * gbs)) for s in range(total // gbs)]
