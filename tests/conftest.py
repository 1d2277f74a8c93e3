"""Shared fixtures: running the real entry point as a user would, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"

# Small and fast: fp32 so layouts agree to 1e-5; mock data needs no corpus.
TINY = [
    "+model=ling_tiny",
    "data=mock",
    "data.seq_length=32",
    "data.num_workers=0",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=8",
    "trainer.params_dtype=fp32",
    "optimizer.lr=1e-3",
    "optimizer.min_lr=1e-3",
    "optimizer.lr_decay_style=constant",
]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(var, None)
    return env


def script_cmd(script: Path | str, args: list[str], nproc: int = 1) -> list[str]:
    """The command line running ``script``: plain Python for one process, else torchrun."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [sys.executable, *launcher, str(script), *args]


def run_pretrain(
    output_dir: Path, overrides: list[str], nproc: int = 1, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run launch/pretrain.py (under torchrun when nproc > 1) and return the process."""
    cmd = script_cmd(PRETRAIN, [f"run.output_dir={output_dir}", *overrides], nproc)
    # A new session, so a timeout can stop torchrun's workers too, not only torchrun.
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(
                f"{' '.join(cmd)} timed out after {timeout} s:\n{stderr[-4000:]}"
            ) from err
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def seed_checkpoint(tmp_path_factory) -> Path:
    """A step-0 checkpoint of ling_tiny that every layout starts from."""
    out = tmp_path_factory.mktemp("seed")
    run_pretrain(out, [*TINY, "checkpoint.seed_checkpoint=true"])
    return out / "checkpoints"
