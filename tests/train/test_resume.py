"""A run stopped and resumed follows the uninterrupted run exactly, RNG states included, with
synchronous and background (async) saves; init_from is weights only."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

KEYS = ("loss", "mtp_loss", "grad_norm", "lr", "expert_load_max_violation", "val_loss")
# Evaluations start a data loader each, which draws from torch's generator: the RNG states
# a resumed run restores are not the ones a fresh start has.
COMMON = [
    *TINY,
    "optimizer.lr_decay_style=cosine",
    "optimizer.min_lr=1e-4",
    "optimizer.lr_warmup_steps=2",
    "optimizer.lr_decay_steps=6",
    "trainer.eval_interval=2",
    "trainer.eval_iters=1",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, seed_checkpoint):
    out = tmp_path_factory.mktemp("straight")
    run_pretrain(
        out, [*COMMON, f"checkpoint.init_from={seed_checkpoint}", "trainer.max_steps=6"], 2
    )
    return out


def _rng_states(run, step: int) -> list[dict]:
    rng = run / "checkpoints" / f"iter_{step:07d}" / "rng"
    return [torch.load(p, weights_only=True) for p in sorted(rng.glob("rank*.pt"))]


def _assert_same_states(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_states(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_equals_uninterrupted(tmp_path, seed_checkpoint, straight, async_save):
    resumed = tmp_path / "resumed"
    # Stopped after step 3 (as a preempted job would be), with the same schedule length.
    first = [
        *COMMON,
        f"checkpoint.init_from={seed_checkpoint}",
        f"checkpoint.async_save={async_save}",
    ]
    if async_save:  # a background save after every step, completed while training goes on
        first.append("checkpoint.save_interval=1")
    run_pretrain(resumed, [*first, "trainer.max_steps=3"], nproc=2)
    state = json.loads((resumed / "checkpoints" / "iter_0000003" / "train_state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 24
    # Same output dir: the newest checkpoint is resumed (init_from is ignored then).
    run_pretrain(resumed, [*first, "trainer.max_steps=6"], nproc=2)

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], "metrics.jsonl must continue, not repeat"
    for ra, rb in zip(a, b, strict=True):
        assert ("val_loss" in ra) == ("val_loss" in rb) == (ra["step"] % 2 == 0)
        for key in KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    # Every rank's generators at the end are the uninterrupted run's: restored, not reseeded.
    ends, resumed_ends = _rng_states(straight, 6), _rng_states(resumed, 6)
    assert len(ends) == len(resumed_ends) == 2
    for rank, (sa, sb) in enumerate(zip(ends, resumed_ends, strict=True)):
        _assert_same_states(sa, sb, f"rank{rank}")
    assert not torch.equal(ends[0]["torch"], _rng_states(resumed, 3)[0]["torch"])
    if async_save:
        saved = sorted(p.name for p in (resumed / "checkpoints").iterdir())
        assert saved == [f"iter_{s:07d}" for s in range(1, 7)] + ["latest"]
        assert all((resumed / "checkpoints" / n / "manifest.json").is_file() for n in saved[:-1])


def test_rerun_at_max_steps_does_nothing(tmp_path, seed_checkpoint):
    out = tmp_path / "run"
    run_pretrain(out, [*TINY, "trainer.max_steps=2", f"checkpoint.init_from={seed_checkpoint}"])
    config = (out / "config.yaml").read_text()
    proc = run_pretrain(out, [*TINY, "trainer.max_steps=1"])
    assert "already at step 2 >= trainer.max_steps=1: nothing to do" in proc.stderr
    assert len(read_metrics(out)) == 2
    assert (out / "config.yaml").read_text() == config, "config.yaml describes the checkpoints"
    assert "max_steps: 2" in config
