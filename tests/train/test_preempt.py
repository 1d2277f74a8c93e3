"""Stopping cleanly on signals and deadlines, without Slurm: one process and torchrun.

Every way a stop request reaches a run (SIGUSR1/SIGUSR2/SIGTERM to the process, to torchrun
with and without ``--signals-to-handle``, to one rank only, a time budget) must end with
every rank stopping at the same step, one complete checkpoint, the status file and exit
code 75, and a resume that continues the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from types import SimpleNamespace

import pytest

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.train import preempt
from tests.conftest import (
    TINY,
    pretrain_log,
    read_metrics,
    run_pretrain,
    start_pretrain,
    wait_for_metrics,
)

KEYS = ("loss", "mtp_loss", "z_loss", "grad_norm", "lr", "expert_load_max_violation")
LONG = [*TINY, "data.num_workers=1", "trainer.max_steps=100000"]
SIGNALS_TO_HANDLE = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def _status(out) -> dict:
    return json.loads((out / "exit_status.json").read_text())


def _assert_stopped(out, reason: str, ranks: int) -> int:
    """The run stopped for ``reason`` with a complete checkpoint; returns the step."""
    status = _status(out)
    assert status["outcome"] == "stopped" and status["exit_code"] == 75, status
    assert status["reason"] == reason, status
    step = status["step"]
    ckpt = out / "checkpoints" / f"iter_{step:07d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == step
    log = pretrain_log(out)
    assert log.count(f"stopping at step {step}") == ranks, "every rank stops at the same step"
    assert f"checkpoint of step {step} complete after" in log
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    return step


def _wait_gone(pids: list[int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} still running"


def _worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    workers = {}
    for child in open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        for item in environ:
            if item.startswith(b"RANK="):
                workers[int(item[5:])] = int(child)
    return workers


def test_signal_stops_one_process_and_the_resume_is_exact(tmp_path):
    steps = 12
    straight = tmp_path / "straight"
    run_pretrain(straight, [*TINY, f"trainer.max_steps={steps}"])

    out = tmp_path / "stopped"
    proc = start_pretrain(out, [*TINY, "data.num_workers=1", f"trainer.max_steps={steps}"])
    wait_for_metrics(out, 3, proc=proc)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == 75, pretrain_log(out)[-3000:]
    step = _assert_stopped(out, "SIGUSR2", ranks=1)
    assert step < steps

    run_pretrain(out, [*TINY, f"trainer.max_steps={steps}"])
    assert _status(out)["outcome"] == "finished" and _status(out)["exit_code"] == 0
    a, b = read_metrics(straight), read_metrics(out)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            assert rb[key] == ra[key], (ra["step"], key)


@pytest.mark.distributed
def test_sigusr1_to_torchrun_reaches_every_rank(tmp_path):
    """torchrun started with --signals-to-handle passes SIGUSR1 on (and exits 1 itself)."""
    out = tmp_path / "run"
    proc = start_pretrain(out, LONG, nproc=2, launcher_args=[SIGNALS_TO_HANDLE])
    wait_for_metrics(out, 3, proc=proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 1  # torchrun's own code after a handled signal
    _assert_stopped(out, "SIGUSR1", ranks=2)


@pytest.mark.distributed
def test_plain_torchrun_killed_by_sigusr1_still_saves(tmp_path):
    """Without --signals-to-handle SIGUSR1 kills torchrun; its workers get SIGTERM from the
    kernel (parent-death signal) and still stop together and save."""
    out = tmp_path / "run"
    proc = start_pretrain(out, LONG, nproc=2)
    wait_for_metrics(out, 3, proc=proc)
    workers = list(_worker_pids(proc.pid).values())
    assert len(workers) == 2
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == -signal.SIGUSR1
    _wait_gone(workers)
    _assert_stopped(out, "torchrun agent died", ranks=2)


@pytest.mark.distributed
def test_sigusr2_to_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    proc = start_pretrain(out, LONG, nproc=2)
    wait_for_metrics(out, 3, proc=proc)
    workers = _worker_pids(proc.pid)
    os.kill(workers[1], signal.SIGUSR2)
    proc.wait(timeout=120)
    step = _assert_stopped(out, "SIGUSR2", ranks=2)
    # torchrun reports the workers' code (then exits 1 itself, as it does for any code != 0).
    assert "exitcode  : 75" in pretrain_log(out)
    assert step >= 3


def test_time_budget_saves_before_it_is_spent(tmp_path):
    out = tmp_path / "run"
    overrides = [
        *LONG,
        "trainer.max_minutes=0.3",
        "trainer.stop_margin_seconds=2",
        "checkpoint.save_interval=4",
    ]
    proc = run_pretrain(out, overrides, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    status = _status(out)
    assert status["reason"] == "time limit" and status["slowest_save_seconds"] > 0
    text = proc.stdout + proc.stderr
    deadline = text.split("deadline ")[1].split(" (trainer.max_minutes)")[0]
    # The checkpoint was complete before the budget ran out.
    assert datetime.fromisoformat(status["time"]) <= datetime.fromisoformat(deadline)
    ckpt = out / "checkpoints" / f"iter_{status['step']:07d}"
    assert (ckpt / "train_state.json").is_file()


def test_a_bad_stop_field_is_refused_before_any_work(tmp_path):
    proc = run_pretrain(tmp_path / "bad", [*TINY, "trainer.max_minutes=0"], check=False)
    assert proc.returncode == 2 and "trainer.max_minutes=0.0 must be > 0" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def _cfg(max_minutes=None, margin=0.0, timeout=30.0):
    trainer = SimpleNamespace(max_minutes=max_minutes, stop_margin_seconds=margin)
    return SimpleNamespace(
        trainer=trainer, run=SimpleNamespace(distributed_timeout_minutes=timeout)
    )


def test_validation_names_each_bad_stop_field(tmp_path):
    from ling_pretrain.config import compose
    from ling_pretrain.jobs.validate import validate

    ok = [*TINY, f"run.output_dir={tmp_path}"]
    validate(compose([*ok, "trainer.max_minutes=5"]), 1)
    bad = ["trainer.max_minutes=-1", "trainer.stop_margin_seconds=-2"]
    with pytest.raises(ConfigError) as err:
        validate(compose([*ok, *bad, "run.distributed_timeout_minutes=0"]), 1)
    text = str(err.value)
    assert "3 problem(s)" in text and "trainer.max_minutes=-1" in text
    assert "trainer.stop_margin_seconds=-2" in text and "run.distributed_timeout_minutes=0" in text


def test_slurm_end_time(monkeypatch):
    assert preempt.slurm_job_end_time({}) is None
    assert (
        preempt.slurm_job_end_time({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1700000000"})
        == 1700000000.0
    )
    # Slurm before 23.02 has no variable; without squeue there is no deadline, and no crash.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert preempt.slurm_job_end_time({"SLURM_JOB_ID": "7"}) is None


def test_deadline_stops_when_one_step_and_one_save_no_longer_fit(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    stop = preempt.StopRequests(_cfg(max_minutes=0.5, margin=5.0), str(tmp_path), rank=0)
    assert not stop.requested("cpu")
    stop.step_done(20.0)
    stop.save_done(30.0)  # 20 + 30 + 5 s no longer fit in the 30 s budget
    assert stop.requested("cpu") and stop.decision.reason == "time limit"
    stop.finish(step=3, max_steps=10, checkpoint=None)
    status = preempt.read_status(tmp_path)
    assert status["exit_code"] == 75 and status["slowest_save_seconds"] == 30.0
    # The next attempt starts from the slowest times measured so far.
    again = preempt.StopRequests(_cfg(), str(tmp_path), rank=0)
    assert (again.slowest_step, again.slowest_save) == (20.0, 30.0)


def test_signal_is_recorded_not_fatal(monkeypatch):
    monkeypatch.setattr(preempt, "_received", None)
    assert preempt.install_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        got = preempt.received()
        assert got is not None and got[0] == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first
        assert preempt.received() == got
    finally:
        preempt.restore_signal_handlers()
        monkeypatch.setattr(preempt, "_received", None)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


_LOADER = """
import sys, time
import torch
from ling_pretrain.train import preempt

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10
    def __getitem__(self, i):
        if i == 0:
            return i
        time.sleep(600)  # busy in a fetch: torch's parent watchdog is not consulted

preempt.keep_data_workers_alive()
loader = torch.utils.data.DataLoader(Slow(), num_workers=1, prefetch_factor=1)
it = iter(loader)
next(it)
print(" ".join(str(w.pid) for w in it._workers), flush=True)
time.sleep(600)
"""


def test_a_data_worker_dies_with_its_killed_main_process():
    """Workers ignore SIGTERM (the main process saves first), but a main process killed
    outright must not leave them behind: they would keep the job step and its rendezvous port."""
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    proc = subprocess.Popen(
        [sys.executable, "-c", _LOADER], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE
    )
    try:
        (worker,) = (int(pid) for pid in proc.stdout.readline().split())
        assert os.path.exists(f"/proc/{worker}")
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = os.path.exists(f"/proc/{worker}")
        if alive:
            os.kill(worker, signal.SIGKILL)
        assert not alive, "the data-loader worker outlived its killed main process"
    finally:
        proc.kill()
