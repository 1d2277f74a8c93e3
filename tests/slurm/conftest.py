"""A real two-node Slurm cluster on this machine (launch/slurm/local_cluster.sh), for tests
that submit the project's sbatch scripts unchanged.

``slurm_cluster`` is session-scoped: the cluster comes up once and goes down after the
session. It skips the test, with the reason, where Slurm or munge is not installed or the
tests do not run as root. :class:`SlurmCluster` submits jobs, reads their state, releases a
requeued job's hold and finds the processes of a job's ranks, so any Slurm test can use it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

CLUSTER_SCRIPT = REPO / "launch" / "slurm" / "local_cluster.sh"
PRETRAIN_SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "scancel")


def _free_port_base(start: int = 17100, stop: int = 19000) -> int:
    """The first port p in [start, stop) with p, p+1 and p+2 free on this machine."""
    for base in range(start, stop, 3):
        try:
            for port in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no three free consecutive ports for the test cluster")


class SlurmCluster:
    """Client side of the test cluster."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.conf = directory / "slurm.conf"

    def env(self, **extra: str) -> dict:
        """The environment a submitting shell would have: the cluster and the project's
        Python (sbatch passes the submitting environment on to the job)."""
        env = subprocess_env()
        env.update(SLURM_CONF=str(self.conf), PYTHON=sys.executable)
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env(), capture_output=True, text=True, check=check, **kw
        )

    def submit(
        self,
        script: Path,
        args: Sequence[str] = (),
        sbatch_args: Sequence[str] = (),
        cwd: Path | None = None,
        env: dict | None = None,
    ) -> str:
        """``sbatch --parsable [sbatch_args] script [args]`` from ``cwd``; returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            cwd=cwd,
            env=env or self.env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(
        self, job_id: str, done: Callable[[dict], bool], timeout: float, what: str
    ) -> dict:
        """Poll the job until ``done(job)``; fail naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: not {what} after {timeout} s: {info}")
            time.sleep(0.3)

    def wait_finished(self, job_id: str, timeout: float = 240) -> dict:
        """Wait until the job has ended (completed, failed or cancelled) for good."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        return self.wait_for(job_id, lambda j: j.get("JobState") in ended, timeout, "finished")

    def wait_requeued(self, job_id: str, restarts: int, timeout: float = 120) -> dict:
        """Wait until the job is pending again after its ``restarts``-th requeue."""
        return self.wait_for(
            job_id,
            lambda j: j.get("JobState") == "PENDING" and j.get("Restarts") == str(restarts),
            timeout,
            f"requeued ({restarts})",
        )

    def release(self, job_id: str, timeout: float = 60) -> None:
        """Start a requeued job now instead of after Slurm's hold (about two minutes).

        Waits until the nodes have finished cleaning up the previous attempt, and a little
        more: slurmd refuses a launch whose credential is from the second in which the
        previous attempt's was revoked ("Job credential revoked"), failing the job.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
            if states and all(s == "idle" for s in states):
                break
            assert time.monotonic() < deadline, f"nodes not idle after {timeout} s: {states}"
            time.sleep(0.3)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def signal_batch(self, job_id: str, sig: str) -> None:
        """Send ``sig`` to the job's batch shell only (as ``--signal=B:...`` does)."""
        self.run("scancel", "--batch", f"--signal={sig}", job_id)

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)


def rank_pids(marker: str, rank: int) -> list[int]:
    """Pids of training processes whose command line contains ``marker`` (e.g. the run
    directory) and whose environment says ``RANK=rank`` (data-loader workers included)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "launch/pretrain.py" in cmdline and marker in cmdline:
            if f"RANK={rank}".encode() in environ:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """Bring the two-node cluster up for the session; skip where it cannot run."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed (no {', '.join(missing)}); apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd runs as root)")
    directory = tmp_path_factory.mktemp("slurm-cluster")
    env = dict(os.environ, LING_SLURM_PORT=str(_free_port_base()))
    up = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "up", str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(directory)], env=env)
        raise AssertionError(f"local Slurm cluster did not come up:\n{up.stdout}\n{up.stderr}")
    try:
        yield SlurmCluster(directory)
    finally:
        subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "down", str(directory)],
            env=env,
            capture_output=True,
            timeout=180,
        )
