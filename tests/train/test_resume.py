"""A run stopped and resumed follows the uninterrupted run bit for bit, at every logged value
and in every tensor of its final checkpoint, on one process, DP2 and EP2; init_from is
weights only."""

from __future__ import annotations

import json
import shutil

import pytest

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
    "skipped",
    "tokens",
)
LAYOUTS = {
    "one": (1, []),
    "dp2": (2, []),
    "ep2": (2, ["parallel.expert_model_parallel_size=2"]),
}


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
        # Step 3 (the resumed checkpoint's) and step 5 are loss spikes: the resumed run must
        # restore the spike statistics to skip step 5 as the uninterrupted run does.
        "trainer.inject_loss_spike_steps=[3,5]",
        "trainer.loss_spike_warmup=2",
    ]
    straight = tmp_path / "straight"
    run_pretrain(straight, [*common, "trainer.max_steps=6", "checkpoint.save_interval=3"], nproc)
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
        for key in KEYS:
            assert rb[key] == ra[key], (ra["step"], key, ra[key], rb[key])

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


def test_rerun_at_max_steps_does_nothing(tmp_path, seed_checkpoint):
    out = tmp_path / "run"
    run_pretrain(out, [*TINY, "trainer.max_steps=2", f"checkpoint.init_from={seed_checkpoint}"])
    proc = run_pretrain(out, [*TINY, "trainer.max_steps=2"])
    assert "already at step 2" in proc.stderr + proc.stdout
    assert len(read_metrics(out)) == 2
