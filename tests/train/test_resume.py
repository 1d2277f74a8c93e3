"""A run stopped and resumed follows the uninterrupted run exactly; init_from is weights only."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

KEYS = ("loss", "mtp_loss", "grad_norm", "lr", "expert_load_max_violation")


def test_resume_equals_uninterrupted(tmp_path, seed_checkpoint):
    common = [
        *TINY,
        f"checkpoint.init_from={seed_checkpoint}",
        "optimizer.lr_decay_style=cosine",
        "optimizer.min_lr=1e-4",
        "optimizer.lr_warmup_steps=2",
    ]
    straight = tmp_path / "straight"
    run_pretrain(straight, [*common, "trainer.max_steps=6", "optimizer.lr_decay_steps=6"], nproc=2)

    resumed = tmp_path / "resumed"
    # Stopped after step 3 (as a preempted job would be), with the same schedule length.
    run_pretrain(resumed, [*common, "trainer.max_steps=3", "optimizer.lr_decay_steps=6"], nproc=2)
    state = json.loads((resumed / "checkpoints" / "iter_0000003" / "train_state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 24
    # Same output dir: the newest checkpoint is resumed (init_from is ignored then).
    run_pretrain(resumed, [*common, "trainer.max_steps=6", "optimizer.lr_decay_steps=6"], nproc=2)

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], "metrics.jsonl must continue, not repeat"
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def test_rerun_at_max_steps_does_nothing(tmp_path, seed_checkpoint):
    out = tmp_path / "run"
    run_pretrain(out, [*TINY, "trainer.max_steps=2", f"checkpoint.init_from={seed_checkpoint}"])
    proc = run_pretrain(out, [*TINY, "trainer.max_steps=2"])
    assert "already at step 2" in proc.stderr + proc.stdout
    assert len(read_metrics(out)) == 2
