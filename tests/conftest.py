"""Shared fixtures: running the real entry point as a user would, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def start_pretrain(
    output_dir: Path, overrides: list[str], nproc: int = 1, launcher_args: list[str] = ()
) -> subprocess.Popen:
    """Start launch/pretrain.py in the background, in its own session, for tests that signal
    it; stdout and stderr go to ``<output_dir>.log`` (see :func:`pretrain_log`)."""
    cmd = script_cmd(PRETRAIN, [f"run.output_dir={output_dir}", *overrides], nproc)
    if nproc > 1:
        cmd[4:4] = list(launcher_args)  # after "-m torch.distributed.run --standalone"
    with open(f"{output_dir}.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def pretrain_log(output_dir: Path) -> str:
    """What a process started by :func:`start_pretrain` printed."""
    return Path(f"{output_dir}.log").read_text()


def wait_for_metrics(
    output_dir: Path, lines: int, timeout: float = 180, proc: subprocess.Popen | None = None
) -> None:
    """Wait until ``metrics.jsonl`` in ``output_dir`` has ``lines`` lines."""
    deadline = time.monotonic() + timeout
    path = Path(output_dir) / "metrics.jsonl"
    while not (path.is_file() and len(path.read_text().splitlines()) >= lines):
        if proc is not None and proc.poll() is not None:
            tail = pretrain_log(output_dir)[-4000:]
            raise AssertionError(f"the run ended early ({proc.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {lines} metrics lines in {path} after {timeout} s")
        time.sleep(0.2)


def checkpoint_tensors(checkpoint_dir: Path, scratch: Path) -> dict:
    """Every tensor of a megatron distributed checkpoint at its full (layout-free) shape, by
    checkpoint key (weights, expert biases, optimizer states), read in this process."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(checkpoint_dir), str(scratch))
    loaded = torch.load(scratch, weights_only=False)
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def tensor_differences(a: dict, b: dict) -> list[str]:
    """Keys whose tensors are not bit-identical (or that only one side has)."""
    import torch

    def same(x, y) -> bool:
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))

    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not same(a[k], b[k]))
