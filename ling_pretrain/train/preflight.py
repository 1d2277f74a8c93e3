"""Checks and records made once per job attempt, before any training process starts.

``launch/slurm/pretrain.sbatch`` runs this on the batch node:

    python -m ling_pretrain.train.preflight --world-size 16 --nproc-per-node 8 \\
        --record job-1234.0 -- +model=ling_mini trainer.max_steps=1000 ...

It composes the config from the same overrides the trainer gets, validates it for the job's
world size, makes sure the run directory can be written, and prints the directories the
script needs as shell assignments (``RUN_DIR=...``, ``SAVE_DIR=...``). That way the
script's idea of the run directory is the trainer's, and nothing is guessed in bash. With
``--record`` it also writes what is needed to reproduce the attempt into
``<run.output_dir>/records/<name>/``: the resolved config, the overrides, ``pip freeze``,
``python -m torch.utils.collect_env``, the git revision (with uncommitted changes) and the
Slurm environment. A bad config or an unwritable directory exits with code 2 and a message,
in seconds, before any node starts training.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ling_pretrain.config.load import compose_job
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_text
from ling_pretrain.jobs.validate import Hardware, validate

EXIT_BAD_INPUT = 2
"""Exit code for a job that cannot run as configured (nothing was started)."""


@dataclass(frozen=True)
class JobDirs:
    """Where a job writes, as absolute paths."""

    run_dir: Path
    """``run.output_dir``: config, metrics, logs, records, status file."""
    save_dir: Path
    """``checkpoint.save_dir`` (default ``<run_dir>/checkpoints``)."""


def check_writable(path: Path, field: str) -> None:
    """Create ``path`` if needed and write a file there.

    Raises:
        ConfigError: naming ``field`` when the directory cannot be created or written.
    """
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{field}={path} is not writable from {os.uname().nodename}: {err}. Choose a "
            "directory on a shared file system that every node of the job can write."
        ) from None


def resolve_job(overrides: Sequence[str], world_size: int, nproc_per_node: int) -> tuple:
    """Compose and validate the job config; return ``(cfg, layout, JobDirs)``.

    Raises:
        ConfigError: for any problem validation finds, or an unwritable directory.
    """
    cfg = compose_job(list(overrides))
    layout = validate(cfg, world_size, Hardware.detect(nproc_per_node))
    run_dir = Path(cfg.run.output_dir).absolute()
    save_dir = Path(cfg.checkpoint.save_dir or run_dir / "checkpoints").absolute()
    check_writable(run_dir, "run.output_dir")
    check_writable(save_dir, "checkpoint.save_dir")
    return cfg, layout, JobDirs(run_dir, save_dir)


def _command_output(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        return f"$ {shlex.join(cmd)}\nnot available: {err}\n"
    out = f"$ {shlex.join(cmd)}\n{proc.stdout}"
    if proc.returncode != 0:
        out += f"(exit code {proc.returncode})\n{proc.stderr}"
    return out


def _installed_packages() -> str:
    """``pip freeze``, or the installed distributions when pip is absent (uv environments)."""
    out = _command_output([sys.executable, "-m", "pip", "freeze"])
    if "(exit code" not in out and "not available" not in out:
        return out
    from importlib import metadata

    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    return out + "\n# pip is not usable here; installed distributions:\n" + "\n".join(names) + "\n"


def _git_report(code_dir: Path) -> str:
    parts = [f"ling_pretrain imported from {code_dir / 'ling_pretrain'}\n"]
    for cmd in (
        ["git", "rev-parse", "HEAD"],
        ["git", "status", "--porcelain"],
        ["git", "diff", "HEAD"],
    ):
        parts.append(_command_output(cmd, cwd=code_dir, timeout=60))
    return "\n".join(parts)


def record_attempt(cfg: Any, overrides: Sequence[str], run_dir: Path, name: str) -> Path:
    """Write the reproducibility records of one job attempt to ``run_dir/records/name``."""
    out = run_dir / "records" / name
    code_dir = Path(__file__).resolve().parents[2]
    slurm = "".join(f"{k}={v}\n" for k, v in sorted(os.environ.items()) if k.startswith("SLURM_"))
    records = {
        "config.yaml": lambda: OmegaConf.to_yaml(cfg, resolve=True),
        "overrides.txt": lambda: shlex.join(overrides) + "\n",
        "pip-freeze.txt": _installed_packages,
        "collect-env.txt": lambda: _command_output(
            [sys.executable, "-m", "torch.utils.collect_env"]
        ),
        "git.txt": lambda: _git_report(code_dir),
        "slurm-env.txt": lambda: slurm,
    }
    for filename, make in records.items():
        atomic_write_text(out / filename, make())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ling_pretrain.train.preflight",
        description="Validate a training job and resolve its directories before it starts.",
    )
    parser.add_argument("--world-size", type=int, required=True, help="training processes")
    parser.add_argument("--nproc-per-node", type=int, required=True, help="processes per node")
    parser.add_argument("--record", metavar="NAME", help="write records/NAME in the run dir")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for pretrain.py")
    args = parser.parse_args(argv)
    # stdout carries only the assignments below; anything a library prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            cfg, layout, dirs = resolve_job(args.overrides, args.world_size, args.nproc_per_node)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.record:
            record_attempt(cfg, args.overrides, dirs.run_dir, args.record)
    values = {
        "RUN_DIR": str(dirs.run_dir),
        "SAVE_DIR": str(dirs.save_dir),
        "MAX_STEPS": str(cfg.trainer.max_steps),
        "LAYOUT": f"TP={layout.tp} PP={layout.pp} EP={layout.ep} CP={layout.cp} DP={layout.dp}",
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
