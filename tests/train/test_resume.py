"""A run stopped and resumed follows the uninterrupted run bit for bit, at every logged value,
in every tensor of its final checkpoint and in every rank's RNG states, on one process, DP2
(with background saves) and EP2; a rerun at max_steps does nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import (
    TINY,
    checkpoint_tensors,
    read_metrics,
    run_pretrain,
    tensor_differences,
)

pytestmark = pytest.mark.distributed

KEYS = (
    "loss",
    "mtp_loss",
    "z_loss",
    "grad_norm",
    "lr",
    "expert_load_max_violation",
    "expert_load_max",
    "expert_load_min",
    "skipped",
    "tokens",
)
# name: (processes, overrides for both runs). DP2 saves in the background after every step.
LAYOUTS = {
    "one": (1, ["checkpoint.save_interval=3"]),
    "dp2_async": (2, ["checkpoint.async_save=true", "checkpoint.save_interval=1"]),
    "ep2": (2, ["parallel.expert_model_parallel_size=2", "checkpoint.save_interval=3"]),
}


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


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_equals_uninterrupted(tmp_path, seed_checkpoint, name):
    nproc, layout = LAYOUTS[name]
    common = [
        *TINY,
        *layout,
        f"checkpoint.init_from={seed_checkpoint}",
        "optimizer.lr_decay_style=cosine",
        "optimizer.min_lr=1e-4",
        "optimizer.lr_warmup_steps=2",
        "optimizer.lr_decay_steps=6",
        # Evaluations start a data loader each, which draws from torch's generator: the RNG
        # states a resumed run restores are not the ones a fresh start has.
        "trainer.eval_interval=2",
        "trainer.eval_iters=1",
        # Step 3 (the resumed checkpoint's) and step 5 are loss spikes: the resumed run must
        # restore the spike statistics to skip step 5 as the uninterrupted run does.
        "trainer.inject_loss_spike_steps=[3,5]",
        "trainer.loss_spike_warmup=2",
    ]
    straight = tmp_path / "straight"
    run_pretrain(straight, [*common, "trainer.max_steps=6"], nproc)
    state = json.loads((straight / "checkpoints" / "iter_0000003" / "train_state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 24

    # A run killed after step 5 whose newest checkpoint is step 3's: its directory holds that
    # checkpoint and metrics lines past it (here all six). Running it again resumes at step 3.
    resumed = tmp_path / "resumed"
    shutil.copytree(
        straight / "checkpoints" / "iter_0000003", resumed / "checkpoints" / "iter_0000003"
    )
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")
    run_pretrain(resumed, [*common, "trainer.max_steps=6"], nproc=nproc)

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], "one line per step, none repeated"
    assert [r["skipped"] for r in a] == [False, False, True, False, True, False]
    for ra, rb in zip(a, b, strict=True):
        assert ("val_loss" in ra) == ("val_loss" in rb) == (ra["step"] % 2 == 0)
        for key in (*KEYS, "val_loss"):
            assert rb.get(key) == ra.get(key), (ra["step"], key, ra.get(key), rb.get(key))

    # Weights, expert biases, fp32 master weights and both moments, bit for bit.
    final = "checkpoints/iter_0000006"
    ta = checkpoint_tensors(straight / final, tmp_path / "a.pt")
    tb = checkpoint_tensors(resumed / final, tmp_path / "b.pt")
    assert any(k.endswith("expert_bias") for k in ta) and any("exp_avg_sq" in k for k in ta)
    assert tensor_differences(ta, tb) == []
    # The data position and the bad-step statistics.
    sa = json.loads((straight / final / "train_state.json").read_text())
    sb = json.loads((resumed / final / "train_state.json").read_text())
    assert sa == sb and sa["consumed_samples"] == 48 and sa["bad_steps"]["total"] == 2
    # Every rank's generators at the end are the uninterrupted run's: restored, not reseeded.
    ends, resumed_ends = _rng_states(straight, 6), _rng_states(resumed, 6)
    assert len(ends) == len(resumed_ends) == nproc
    for rank, (ea, eb) in enumerate(zip(ends, resumed_ends, strict=True)):
        _assert_same_states(ea, eb, f"rank{rank}")
    assert not torch.equal(ends[0]["torch"], _rng_states(straight, 3)[0]["torch"])
    if name == "dp2_async":  # every background save completed, with its manifest
        saved = sorted(p.name for p in (straight / "checkpoints").iterdir())
        assert saved == [f"iter_{s:07d}" for s in range(1, 7)] + ["latest"]
        assert all((straight / "checkpoints" / n / "manifest.json").is_file() for n in saved[:-1])


def test_rerun_at_max_steps_does_nothing(tmp_path, seed_checkpoint):
    out = tmp_path / "run"
    run_pretrain(out, [*TINY, "trainer.max_steps=2", f"checkpoint.init_from={seed_checkpoint}"])
    config = (out / "config.yaml").read_text()
    proc = run_pretrain(out, [*TINY, "trainer.max_steps=1"])
    assert "already at step 2 >= trainer.max_steps=1: nothing to do" in proc.stderr
    assert len(read_metrics(out)) == 2
    assert (out / "config.yaml").read_text() == config, "config.yaml describes the checkpoints"
    assert "max_steps: 2" in config
