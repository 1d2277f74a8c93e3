"""launch/slurm/pretrain.sbatch on a real two-node Slurm cluster (2 nodes x 1 process):
(a) the warning signal, (b) a short time limit, (c) scancel, (d) a damaged newest checkpoint,
a stalled rank and bad input.

The whole chain is exercised: Slurm -> batch shell -> srun -> every rank. Each test submits
the shipped script unchanged (GPUs are turned off on the command line, as a CPU cluster
needs) and checks what a user would see: checkpoints, requeues, the resumed run's metrics,
exit codes and log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import datetime

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain
from tests.slurm.conftest import PRETRAIN_SBATCH, rank_pids

# One local cluster at a time: the Slurm tests live in this one file, which the test workers
# (pytest-xdist, --dist loadfile) hand to a single worker.
pytestmark = pytest.mark.slurm

CPU_NODES = ["-N", "2", "--gpus-per-node=0"]
# Data-loader workers on: Slurm's SIGTERM reaches them too, and they must survive it.
SLURM_TINY = [*TINY, "data.num_workers=1"]
KEYS = ("loss", "mtp_loss", "z_loss", "grad_norm", "lr", "expert_load_max_violation")


def _wait_for_steps(run_dir, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.is_file() and len(path.read_text().splitlines()) >= n):
        assert time.monotonic() < deadline, f"no {n} metrics lines in {path} after {timeout} s"
        time.sleep(0.2)


def _log(run_dir, job: str) -> str:
    return (run_dir / "logs" / f"slurm-{job}.log").read_text()


def _status(run_dir) -> dict:
    return json.loads((run_dir / "exit_status.json").read_text())


def _assert_complete(run_dir, step: int) -> None:
    ckpt = run_dir / "checkpoints" / f"iter_{step:07d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == step and not state["weights_only"]
    assert (ckpt / "metadata.json").is_file()


def test_warning_signal_saves_requeues_and_resumes_bit_equal(slurm_cluster, tmp_path):
    """(a) The time-limit warning mid-run: every rank saves at the same step, the job
    requeues itself, resumes, and ends on the uninterrupted run's numbers, bit for bit."""
    steps = 16
    overrides = [*SLURM_TINY, f"trainer.max_steps={steps}", "checkpoint.save_interval=5"]
    straight = tmp_path / "straight"
    run_pretrain(straight, overrides, nproc=2)

    run_dir = tmp_path / "job"
    job = slurm_cluster.submit(
        PRETRAIN_SBATCH, [*overrides, f"run.output_dir={run_dir}"], CPU_NODES, cwd=tmp_path
    )
    _wait_for_steps(run_dir, 3)
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.wait_requeued(job, restarts=1)
    stopped = _status(run_dir)
    assert stopped["outcome"] == "stopped" and stopped["reason"] == "SIGUSR1"
    assert stopped["exit_code"] == 75 and stopped["slurm_restart_count"] == "0"
    stop_step = stopped["step"]
    assert 3 <= stop_step < steps
    _assert_complete(run_dir, stop_step)
    log = _log(run_dir, job)
    assert log.count(f"stopping at step {stop_step}") == 2, "both ranks stop at the same step"
    assert f"checkpoint of step {stop_step} complete after" in log
    assert "requeueing job" in log

    slurm_cluster.release(job)
    info = slurm_cluster.wait_finished(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    log = _log(run_dir, job)
    assert f"resuming from {run_dir}/checkpoints/iter_{stop_step:07d}" in log
    assert f"finished: step {steps} of trainer.max_steps={steps}" in log
    assert _status(run_dir)["outcome"] == "finished"
    # Each attempt left its records; both attempts' output is in the one log.
    for attempt in ("0", "1"):
        records = run_dir / "records" / f"job-{job}.{attempt}"
        assert {p.name for p in records.iterdir()} >= {
            "config.yaml",
            "pip-freeze.txt",
            "collect-env.txt",
            "git.txt",
        }
        assert re.search(r"^[0-9a-f]{40}$", (records / "git.txt").read_text(), re.M)

    a, b = read_metrics(straight), read_metrics(run_dir)
    assert [r["step"] for r in b] == list(range(1, steps + 1)), "one metrics line per step"
    for ra, rb in zip(a, b, strict=True):
        for key in KEYS:
            assert rb[key] == ra[key], (ra["step"], key, ra[key], rb[key])


def test_short_time_limit_warns_saves_and_requeues_before_the_limit(slurm_cluster, tmp_path):
    """(b) A two-minute job with the warning 45 s before its end: it saves and requeues
    before Slurm's limit (resuming is test (a)'s).

    Slurm checks for due warnings only every so often, so the signal can come up to a minute
    earlier than asked for; 45 s still leaves it after training has started."""
    run_dir = tmp_path / "job"
    overrides = [
        *SLURM_TINY,
        "trainer.max_steps=100000",
        # The trainer's own end-time check would stop it first; here the warning must.
        "trainer.stop_margin_seconds=0",
        f"run.output_dir={run_dir}",
    ]
    sbatch_args = [*CPU_NODES, "--time=00:02:00", "--signal=B:USR1@45"]
    job = slurm_cluster.submit(PRETRAIN_SBATCH, overrides, sbatch_args, cwd=tmp_path)
    running = slurm_cluster.wait_for(job, lambda j: j.get("JobState") == "RUNNING", 60, "running")
    limit = datetime.fromisoformat(running["EndTime"]).timestamp()
    slurm_cluster.wait_requeued(job, restarts=1, timeout=150)
    assert time.time() < limit, "requeued only after the time limit"
    stopped = _status(run_dir)
    assert stopped["reason"] == "SIGUSR1" and stopped["exit_code"] == 75
    _assert_complete(run_dir, stopped["step"])
    log = _log(run_dir, job)
    assert "got SIGUSR1" in log and "DUE TO TIME LIMIT" not in log
    assert "(the end of Slurm job" in log, "the trainer read the job's end time"

    slurm_cluster.cancel(job)
    slurm_cluster.wait_finished(job)


def test_scancel_leaves_a_complete_checkpoint(slurm_cluster, tmp_path):
    """(c) scancel: SIGTERM to every process of the job; the ranks (and their data-loader
    workers) survive it, save together, and the job ends without requeueing."""
    run_dir = tmp_path / "job"
    overrides = [*SLURM_TINY, "trainer.max_steps=100000", f"run.output_dir={run_dir}"]
    job = slurm_cluster.submit(PRETRAIN_SBATCH, overrides, CPU_NODES, cwd=tmp_path)
    _wait_for_steps(run_dir, 3)
    slurm_cluster.cancel(job)
    info = slurm_cluster.wait_finished(job, timeout=60)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    stopped = _status(run_dir)
    assert stopped["reason"] == "SIGTERM" and stopped["exit_code"] == 75
    _assert_complete(run_dir, stopped["step"])
    log = _log(run_dir, job)
    assert "killed by signal" not in log
    assert "not requeueing" in log
    assert stopped["stop_to_checkpoint_seconds"] < 30, "must fit in Slurm's KillWait (30 s)"


def test_stalled_rank_times_out_and_the_job_requeues(slurm_cluster, tmp_path):
    """A rank that stops responding (SIGSTOP) makes its peer's collective time out after
    run.distributed_timeout_minutes; the job fails instead of idling, requeues itself and
    resumes from the newest checkpoint."""
    run_dir = tmp_path / "job"
    steps = 10
    overrides = [
        *SLURM_TINY,
        f"trainer.max_steps={steps}",
        "checkpoint.save_interval=2",
        "run.distributed_timeout_minutes=0.25",
        f"run.output_dir={run_dir}",
    ]
    job = slurm_cluster.submit(PRETRAIN_SBATCH, overrides, CPU_NODES, cwd=tmp_path)
    _wait_for_steps(run_dir, 3)
    # The training process of rank 1 (not its data-loader worker: the oldest pid).
    stalled = min(rank_pids(str(run_dir), rank=1))
    os.kill(stalled, signal.SIGSTOP)
    stopped_at = time.monotonic()
    slurm_cluster.wait_requeued(job, restarts=1, timeout=120)
    detected = time.monotonic() - stopped_at
    log = _log(run_dir, job)
    assert "Timed out" in log, "the peer's collective must time out"
    assert "training failed with code" in log and "requeueing job" in log
    assert detected < 15 + 40, f"the stall ended the attempt only after {detected:.0f} s"

    slurm_cluster.release(job)
    info = slurm_cluster.wait_finished(job)
    assert info["JobState"] == "COMPLETED", info
    assert "resuming from" in _log(run_dir, job)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert not (run_dir / "logs" / "consecutive-failures").exists()


def test_bad_input_fails_before_training(slurm_cluster, tmp_path):
    """A layout the allocation cannot run, an unwritable run directory, a missing Python
    and a bad NPROC_PER_NODE each end the job at once with code 2 and a clear message."""
    cases = {
        "layout": (
            [*SLURM_TINY, "parallel.expert_model_parallel_size=4"],
            {},
            "world size 1 is not a multiple of",
        ),
        "unwritable": ([*SLURM_TINY, "run.output_dir=/proc/ling"], {}, "is not writable"),
        "python": (SLURM_TINY, {"PYTHON": "/nonexistent/python"}, "PYTHON=/nonexistent/python"),
        "nproc": (SLURM_TINY, {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE=two"),
    }
    jobs = {}
    for name, (overrides, extra_env, _) in cases.items():
        out = tmp_path / name
        out.mkdir()
        args = [*overrides] if name == "unwritable" else [*overrides, f"run.output_dir={out}"]
        # One node each, so two of them run at a time.
        jobs[name] = slurm_cluster.submit(
            PRETRAIN_SBATCH,
            args,
            ["-N", "1", "--gpus-per-node=0"],
            cwd=out,
            env=slurm_cluster.env(**extra_env),
        )
    for name, job in jobs.items():
        info = slurm_cluster.wait_finished(job, timeout=120)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (name, info)
        text = (tmp_path / name / f"slurm-ling-pretrain-{job}.out").read_text()
        assert cases[name][2] in text, (name, text)
        assert not (tmp_path / name / "checkpoints").exists()


def test_a_damaged_newest_checkpoint_falls_back_and_the_job_finishes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "job"
    overrides = [*TINY, "data.num_workers=1", "checkpoint.save_interval=2"]
    # An earlier attempt of the run (2 ranks) left checkpoints at steps 2 and 4; then a node
    # died while the newest was being copied: its largest tensor file is cut short.
    run_pretrain(run_dir, [*overrides, "trainer.max_steps=4"], nproc=2)
    ckpts = run_dir / "checkpoints"
    victim = max((ckpts / "iter_0000004").glob("__*.distcp"), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 3)

    job = slurm_cluster.submit(
        PRETRAIN_SBATCH,
        [*overrides, "trainer.max_steps=6", f"run.output_dir={run_dir}"],
        CPU_NODES,
        cwd=tmp_path,
    )
    info = slurm_cluster.wait_finished(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    log = (run_dir / "logs" / f"slurm-{job}.log").read_text()
    assert f"checkpoint {ckpts / 'iter_0000004'} is damaged: {victim.name}: truncated (" in log
    assert f"resuming from {ckpts / 'iter_0000002'} (step 2), the newest intact checkpoint" in log
    assert "finished: step 6 of trainer.max_steps=6" in log
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert (ckpts / "iter_0000004.damaged").is_dir()
    assert (ckpts / "latest").read_text() == "iter_0000006"
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["outcome"] == "finished" and status["slurm_job_id"] == job
