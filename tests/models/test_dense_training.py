"""A few training steps of each tiny dense model through ``launch/pretrain.py`` lower the loss
(fp32, mock data): llama_tiny on one process, qwen3_tiny at TP2 without sequence parallelism."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_pretrain

STEPS = 20
COMMON = [
    "data=mock",
    "data.seq_length=64",
    "data.num_workers=0",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.params_dtype=fp32",
    f"trainer.max_steps={STEPS}",
    "optimizer.lr=1e-3",
    "optimizer.min_lr=1e-3",
    "optimizer.lr_decay_style=constant",
    "checkpoint.save_at_end=false",
]


@pytest.mark.parametrize(
    "preset,nproc,extra",
    [
        ("llama_tiny", 1, []),
        pytest.param(
            "qwen3_tiny",
            2,
            ["parallel.tensor_model_parallel_size=2"],
            marks=pytest.mark.distributed,
        ),
    ],
)
def test_training_lowers_the_loss(tmp_path, preset, nproc, extra):
    run_pretrain(tmp_path, [f"+model={preset}", *COMMON, *extra], nproc=nproc)
    records = [r for r in read_metrics(tmp_path) if r.get("loss") is not None]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.2, losses
    assert all(r.get("mtp_loss") is None for r in records)
