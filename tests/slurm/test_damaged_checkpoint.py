"""(d) launch/slurm/pretrain.sbatch on the two-node cluster meets a damaged newest checkpoint:
the job names the damaged file, falls back to the previous checkpoint and finishes."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain
from tests.slurm.conftest import PRETRAIN_SBATCH

pytestmark = pytest.mark.slurm

CPU_NODES = ["-N", "2", "--gpus-per-node=0"]


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
