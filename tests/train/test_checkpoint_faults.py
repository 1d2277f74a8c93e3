"""What a run does about damaged checkpoints and interrupted saves, as a user sees it: a
damaged newest checkpoint is named and the run falls back to the newest intact one (or stops
with checkpoint.on_damaged=error); kill -9 during a save leaves the previous checkpoint
complete; a requeued run that names checkpoint.load_dir goes on from its own checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from tests.conftest import TINY, pretrain_log, read_metrics, run_pretrain, start_pretrain

KEYS = ("loss", "mtp_loss", "z_loss", "grad_norm", "lr", "expert_load_max_violation")
FAULTS = [*TINY, "checkpoint.save_interval=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Four steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("faults") / "run"
    run_pretrain(out, [*FAULTS, "trainer.max_steps=4"])
    return out


def _copy(base, tmp_path):
    return shutil.copytree(base, tmp_path / "run")


def _biggest(ckpt):
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _assert_same_metrics(a, b) -> None:
    assert [r["step"] for r in b] == [r["step"] for r in a], "one metrics line per step"
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            assert rb[key] == ra[key], (ra["step"], key)


def test_a_truncated_newest_checkpoint_is_named_and_the_run_falls_back(base, tmp_path):
    run = _copy(base, tmp_path)
    ckpts = run / "checkpoints"
    victim = _biggest(ckpts / "iter_0000004")
    size = victim.stat().st_size
    os.truncate(victim, size // 2)
    proc = run_pretrain(run, [*FAULTS, "trainer.max_steps=4"])
    log = proc.stderr
    assert (
        f"checkpoint {ckpts / 'iter_0000004'} is damaged: {victim.name}: truncated "
        f"({size // 2} of {size} bytes); trying the previous checkpoint"
    ) in log
    assert (
        f"resuming from {ckpts / 'iter_0000002'} (step 2), the newest intact checkpoint, "
        "instead of the damaged iter_0000004"
    ) in log
    # Kept for inspection; the run saved step 4 again and goes on from there.
    assert (ckpts / "iter_0000004.damaged" / victim.name).stat().st_size == size // 2
    assert (ckpts / "iter_0000004" / "manifest.json").is_file()
    assert (ckpts / "latest").read_text() == "iter_0000004"
    _assert_same_metrics(read_metrics(base), read_metrics(run))


def test_garbage_in_a_checkpoint_stops_the_run_with_on_damaged_error(base, tmp_path):
    run = _copy(base, tmp_path)
    ckpt = run / "checkpoints" / "iter_0000004"
    victim = _biggest(ckpt)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        f.write(os.urandom(4096))
    overrides = [*FAULTS, "trainer.max_steps=6", "checkpoint.on_damaged=error"]
    proc = run_pretrain(run, overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert message.startswith(
        f"error: checkpoint {ckpt} is damaged: {victim.name}: checksum mismatch"
    )
    assert "set checkpoint.on_damaged=fallback to resume from the newest intact" in message
    assert ckpt.is_dir() and not (ckpt.parent / "iter_0000004.damaged").exists()
    assert len(read_metrics(run)) == 4
    # The status file says "refused" (code 2), so pretrain.sbatch does not requeue the job.
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["exit_code"], status["outcome"]) == (2, "failed"), status


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, async_save):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    overrides = [*FAULTS, f"checkpoint.async_save={async_save}"]
    proc = start_pretrain(run, [*overrides, "trainer.max_steps=100000"])
    deadline = time.monotonic() + 180
    while not (
        (ckpts / "iter_0000002" / "manifest.json").is_file()
        and (ckpts / "iter_0000004.partial").is_dir()
    ):
        assert proc.poll() is None, pretrain_log(run)[-3000:]
        assert time.monotonic() < deadline, "no save of step 4 started"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and, for async saves, its writer
    proc.wait()
    assert not (ckpts / "iter_0000004").exists(), "killed before the save was complete"
    assert (ckpts / "latest").read_text() == "iter_0000002"

    proc = run_pretrain(run, [*overrides, "trainer.max_steps=4"])
    assert f"resuming from {ckpts / 'iter_0000002'}\n" in proc.stderr
    assert (ckpts / "iter_0000004" / "manifest.json").is_file()
    assert not (ckpts / "iter_0000004.partial").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_a_run_started_from_load_dir_goes_on_from_its_own_checkpoints(base, tmp_path):
    """checkpoint.load_dir is where a run starts, not where it stays: the same command run
    again (a requeued job) resumes the run's own newer checkpoint."""
    run = tmp_path / "run"
    start = [*FAULTS, f"checkpoint.load_dir={base / 'checkpoints' / 'iter_0000002'}"]
    proc = run_pretrain(run, [*start, "trainer.max_steps=3"])
    assert f"resuming from {base / 'checkpoints' / 'iter_0000002'}\n" in proc.stderr
    proc = run_pretrain(run, [*start, "trainer.max_steps=4"])
    assert f"resuming from {run / 'checkpoints' / 'iter_0000003'}\n" in proc.stderr
    _assert_same_metrics(read_metrics(base)[2:], read_metrics(run))
