"""A bad step changes nothing (every tensor bit for bit), consumes its batch, and every rank
skips it even when one rank alone saw the NaN; persistent bad steps stop the run cleanly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, read_metrics, run_pretrain, script_cmd, subprocess_env

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "train" / "bad_step_worker.py"
STEPS, BAD = 4, 3


def _run(out: Path, overrides: list[str], nproc: int = 1) -> list[dict]:
    out.mkdir(parents=True)
    cmd = script_cmd(
        WORKER, [str(out), str(STEPS), str(BAD), *TINY, f"run.output_dir={out}", *overrides], nproc
    )
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _kinds(names: list[str]) -> set[str]:
    """What kind of state each snapshot entry is."""
    kinds = set()
    for n in names:
        if ".param." in n:
            kinds.add("weights")
        elif n.endswith("expert_bias"):
            kinds.add("expert bias")
        elif ".main_param" in n:
            kinds.add("master weights")
        elif n.endswith((".exp_avg", ".exp_avg_codes")):
            kinds.add("first moment")
        elif n.endswith((".exp_avg_sq", ".exp_avg_sq_codes")):
            kinds.add("second moment")
        elif n.endswith(".step"):
            kinds.add("steps")
        elif n == "scheduler":
            kinds.add("scheduler")
    return kinds


ALL_KINDS = {
    "weights",
    "expert bias",
    "master weights",
    "first moment",
    "second moment",
    "steps",
    "scheduler",
}


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The same steps with nothing injected: step 3 is a good step."""
    return _run(tmp_path_factory.mktemp("control") / "run", [])[0]


def test_a_good_step_changes_every_kind_of_state(control):
    # Shows the snapshot sees each kind of state, so "nothing changed" below means something.
    assert not control["steps"][BAD - 1]["skipped"]
    assert _kinds(control["changed"]) == ALL_KINDS


CASES = {
    "nan_grad_fp32_adam": ["trainer.inject_nan_grad_steps=[3]"],
    "spike_bf16_adam8bit": [
        "trainer.inject_loss_spike_steps=[3]",
        "trainer.loss_spike_warmup=2",
        "trainer.params_dtype=bf16",
        "optimizer.optimizer=adam8bit",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_step_changes_nothing_and_consumes_its_batch(tmp_path, control, name):
    (run,) = _run(tmp_path / name, CASES[name])
    bad = run["steps"][BAD - 1]
    assert bad["skipped"], bad
    expected = "loss spike" if "spike" in name else "non-finite gradient norm"
    assert bad["reason"].startswith(expected), bad["reason"]
    assert run["changed"] == []
    assert _kinds(run["compared"]) == ALL_KINDS
    if "adam8bit" in name:
        assert any(n.endswith("exp_avg_codes") for n in run["compared"])  # 8-bit storage
    # The batch of the bad step is consumed: the next step reads the next batch.
    assert run["batches"] == control["batches"]
    # The schedule did not move: step 4 runs with the lr the uninterrupted run had at step 3.
    assert run["steps"][BAD]["lr"] == control["steps"][BAD - 1]["lr"]
    assert not run["steps"][BAD]["skipped"]
    assert run["policy"]["in_a_row"] == 0 and run["policy"]["total"] == 1


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    # bf16 so the distributed optimizer keeps separate fp32 master shards on each rank.
    runs = _run(
        tmp_path / "dp2", ["trainer.inject_nan_grad_steps=[3]", "trainer.params_dtype=bf16"], 2
    )
    for run in runs:
        assert run["steps"][BAD - 1]["skipped"], run["rank"]
        assert run["changed"] == [], run["rank"]
        assert _kinds(run["compared"]) == ALL_KINDS
        assert not run["steps"][BAD]["skipped"]
    assert runs[0]["steps"] == runs[1]["steps"]


def test_persistent_bad_steps_stop_the_run_with_code_3(tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(
        out,
        [
            *TINY,
            "trainer.max_steps=8",
            "trainer.inject_nan_grad_steps=[3,4,5]",
            "trainer.max_consecutive_bad_steps=3",
            "checkpoint.save_interval=2",
        ],
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    newest = out / "checkpoints" / "iter_0000004"
    assert (
        f"step 5: 3 bad steps in a row (trainer.max_consecutive_bad_steps=3), the last one: "
        f"non-finite gradient norm (nan). Stopping without saving (the newest intact "
        f"checkpoint is {newest}" in text
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in records] == [False, False, True, True, True]
    assert all(r["skip_reason"] == "non-finite gradient norm (nan)" for r in records[2:])
    assert "skip_reason" not in records[0]
    status = json.loads((out / "exit_status.json").read_text())
    assert (status["exit_code"], status["step"], status["checkpoint"]) == (3, 5, str(newest))
    assert not (out / "checkpoints" / "iter_0000005").exists()
