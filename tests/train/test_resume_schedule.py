"""Extending trainer.max_steps on resume under a cosine decay whose length it sets: refused
without a choice (before any work, the run directory untouched); with
checkpoint.override_scheduler the rate follows the new, longer decay from the checkpoint's
step on; with checkpoint.use_checkpoint_scheduler it stays on the old one (at min_lr after
it ends). The learning rates are checked against megatron's cosine formula."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain

LR, MIN_LR = 1e-3, 1e-4
SCHEDULE = [
    *TINY,
    f"optimizer.lr={LR}",
    f"optimizer.min_lr={MIN_LR}",
    "optimizer.lr_decay_style=cosine",
    "optimizer.lr_warmup_steps=0",
]


def cosine(step: int, decay_steps: int) -> float:
    """megatron's cosine decay without warm-up (the rate after ``step`` optimizer steps)."""
    if step > decay_steps:
        return MIN_LR
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * step / decay_steps) + 1.0)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("schedule") / "run"
    run_pretrain(out, [*SCHEDULE, "trainer.max_steps=4"])
    return out


def test_a_longer_schedule_is_refused_without_a_choice(four_steps, tmp_path):
    run = shutil.copytree(four_steps, tmp_path / "run")
    config = (run / "config.yaml").read_text()
    proc = run_pretrain(run, [*SCHEDULE, "trainer.max_steps=8"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the learning-rate schedule differs from the one" in proc.stderr
    assert "4 in the checkpoint, 8 now" in proc.stderr
    assert "checkpoint.override_scheduler=true" in proc.stderr
    assert "checkpoint.use_checkpoint_scheduler=true" in proc.stderr
    assert (run / "config.yaml").read_text() == config
    assert len(read_metrics(run)) == 4


@pytest.mark.parametrize(
    "choice, decay_steps, told",
    [
        ("override_scheduler", 8, "this config's learning-rate schedule wins"),
        ("use_checkpoint_scheduler", 4, "the checkpoint's learning-rate schedule wins"),
    ],
)
def test_a_longer_schedule_under_each_choice(four_steps, tmp_path, choice, decay_steps, told):
    run = shutil.copytree(four_steps, tmp_path / "run")
    proc = run_pretrain(run, [*SCHEDULE, "trainer.max_steps=8", f"checkpoint.{choice}=true"])
    assert f"WARNING ling_pretrain.train.setup: checkpoint.{choice}=true: {told}" in proc.stderr
    lrs = {r["step"]: r["lr"] for r in read_metrics(run)}
    assert sorted(lrs) == list(range(1, 9))
    for step in range(1, 5):
        assert lrs[step] == pytest.approx(cosine(step, 4), rel=1e-12), step
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(cosine(step, decay_steps), rel=1e-12), step
    if choice == "use_checkpoint_scheduler":
        assert all(lrs[step] == MIN_LR for step in range(5, 9))
    else:
        assert lrs[5] > 3 * MIN_LR  # the new decay starts above where the old one ended
    ckpt = run / "checkpoints" / "iter_0000008"
    scheduler = json.loads((ckpt / "train_state.json").read_text())["scheduler"]
    assert scheduler["lr_decay_steps"] == decay_steps
    # The run directory's config.yaml describes the newest checkpoint.
    assert (run / "config.yaml").read_text() == (ckpt / "config.yaml").read_text()
    assert "max_steps: 8" in (run / "config.yaml").read_text()
