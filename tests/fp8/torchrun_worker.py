"""Runs a test module's ``__main__`` worker under torchrun, as the distributed FP8 tests do."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO, script_cmd, subprocess_env


def run_worker(module_file: str, nproc: int = 2, timeout: int = 300) -> str:
    """Starts ``module_file`` on ``nproc`` gloo processes and returns their stdout.

    Raises:
        AssertionError: The run failed; the message holds the end of its output.
    """
    cmd = script_cmd(Path(module_file).resolve(), [], nproc)
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc.stdout
