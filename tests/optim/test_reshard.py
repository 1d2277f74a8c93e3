"""Optimizer state reshards across TP, PP, EP and DP (megatron's fully_reshardable layout with
torch's AdamW and the 8-bit Adam); what cannot be loaded is refused before anything is read.

A checkpoint is loaded at another layout and saved again at once (``reshard_worker.py``):
every tensor of the new checkpoint, at full shape, must equal the old one's bit for bit
(weights, fp32 master weights, both moments). A resumed run at the new layout must then go on
as the single-process run does (to the precision layouts agree to, tests/train/test_layouts.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    TINY,
    checkpoint_tensors,
    read_metrics,
    run_pretrain,
    script_cmd,
    subprocess_env,
    tensor_differences,
)

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "optim" / "reshard_worker.py"
STEP = "iter_0000002"
LAYOUTS = {
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "ep2": ["parallel.expert_model_parallel_size=2"],
    "dp2": [],
}


def _resave(out: Path, checkpoint: Path, overrides: list[str], nproc: int) -> Path:
    """Load ``checkpoint`` at the layout ``overrides`` give and save it again into ``out``."""
    args = [
        str(out),
        *TINY,
        "trainer.max_steps=2",  # the source run's schedule, so the scheduler saves alike
        f"run.output_dir={out}",
        f"checkpoint.load_dir={checkpoint}",
    ]
    proc = subprocess.run(
        script_cmd(WORKER, [*args, *overrides], nproc),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out / STEP


def _train(out: Path, seed: Path, overrides: list[str], nproc: int = 1) -> Path:
    run_pretrain(
        out, [*TINY, "trainer.max_steps=2", f"checkpoint.init_from={seed}", *overrides], nproc
    )
    return out / "checkpoints" / STEP


@pytest.fixture(scope="module")
def source(tmp_path_factory, seed_checkpoint) -> Path:
    """Two steps of plain Adam on one process."""
    return _train(tmp_path_factory.mktemp("source") / "run", seed_checkpoint, [])


@pytest.fixture(scope="module")
def source_tensors(source, tmp_path_factory) -> dict:
    tensors = checkpoint_tensors(source, tmp_path_factory.mktemp("pt") / "source.pt")
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in tensors)
    assert any(k.startswith("optimizer.state.param.") for k in tensors)
    return tensors


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_one_process_checkpoint_reshards_bit_for_bit(tmp_path, source, source_tensors, name):
    again = _resave(tmp_path / name, source, LAYOUTS[name], nproc=2)
    assert tensor_differences(source_tensors, checkpoint_tensors(again, tmp_path / "x.pt")) == []
    # The same step, data position and schedule; only the layout it was saved at differs.
    state, saved = (json.loads((d / "train_state.json").read_text()) for d in (again, source))
    assert saved.pop("layout")["world_size"] == 1
    assert state == saved


def test_dp2_checkpoint_reshards_to_one_process(tmp_path, seed_checkpoint):
    dp2 = _train(tmp_path / "dp2", seed_checkpoint, [], nproc=2)
    again = _resave(tmp_path / "one", dp2, [], nproc=1)
    a = checkpoint_tensors(dp2, tmp_path / "a.pt")
    assert tensor_differences(a, checkpoint_tensors(again, tmp_path / "b.pt")) == []


def test_resumed_at_ep2_goes_on_like_one_process(tmp_path, source):
    """The moments are used, not only carried: step 4's loss follows from step 3's update."""
    common = [*TINY, "trainer.max_steps=4", f"checkpoint.load_dir={source}"]
    run_pretrain(tmp_path / "one", common)
    run_pretrain(tmp_path / "ep2", [*common, *LAYOUTS["ep2"]], nproc=2)
    one, ep2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ep2")
    assert [r["step"] for r in ep2] == [3, 4]
    for a, b in zip(one, ep2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-5), a["step"]
        assert b["lr"] == a["lr"]


def test_adam8bit_state_reshards_within_one_rounding(tmp_path, seed_checkpoint):
    """8-bit moments are re-encoded in the blocks of the new shards: one more rounding."""
    eight = ["optimizer.optimizer=adam8bit"]
    src = _train(tmp_path / "src", seed_checkpoint, eight)
    again = _resave(tmp_path / "ep2", src, [*eight, *LAYOUTS["ep2"]], nproc=2)
    a = checkpoint_tensors(src, tmp_path / "a.pt")
    b = checkpoint_tensors(again, tmp_path / "b.pt")
    moments = [k for k in a if k.startswith("optimizer.state.exp_avg")]
    assert set(tensor_differences(a, b)) <= set(moments)
    for k in moments:
        scale = a[k].abs().max().item()
        assert (a[k] - b[k]).abs().max().item() <= 0.01 * scale, k


def test_a_checkpoint_without_the_distributed_optimizer_state_is_refused(tmp_path, source):
    proc = run_pretrain(
        tmp_path / "run",
        [
            *TINY,
            "trainer.max_steps=3",
            f"checkpoint.load_dir={source}",
            "parallel.use_distributed_optimizer=false",
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        f"error: checkpoint {source} was saved with the distributed optimizer, and its optimizer "
        "state loads only into the same kind of optimizer. Set "
        "parallel.use_distributed_optimizer=true to resume it" in proc.stderr
    )


def test_old_dp_reshardable_checkpoints_resume_at_their_layout_and_are_refused_elsewhere(
    tmp_path, source
):
    legacy = _resave(tmp_path / "legacy", source, ["--legacy"], nproc=1)
    common = [*TINY, "trainer.max_steps=3", f"checkpoint.load_dir={legacy}"]
    run_pretrain(tmp_path / "same", common)
    proc = run_pretrain(tmp_path / "ep2", [*common, *LAYOUTS["ep2"]], nproc=2, check=False)
    assert proc.returncode != 0
    assert (
        f"error: checkpoint {legacy} holds its optimizer state in megatron's dp_reshardable "
        "layout" in proc.stderr
    )
    assert "this run (TP=1 PP=1 EP=2 ETP=1 DP=2) needs optimizer state it does not hold" in (
        proc.stderr
    )
    assert "KeyError" not in proc.stderr
