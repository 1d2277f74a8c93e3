"""The entry point as a user runs it: the README demo, and fast failures."""

from __future__ import annotations

import shlex
import time

import pytest

from tests.conftest import read_metrics, run_pretrain
from tests.test_docs import _readme_commands


def test_wrong_layout_on_ling_mini_fails_in_seconds_naming_the_fields(tmp_path):
    start = time.perf_counter()
    proc = run_pretrain(
        tmp_path / "bad", ["+model=ling_mini", "parallel.tensor_model_parallel_size=3"], check=False
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert (
        "tensor_model_parallel_size=3 does not divide model.num_attention_heads=16" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_ling_mini_on_a_cpu_machine_is_refused_before_any_work(tmp_path):
    proc = run_pretrain(tmp_path / "mini", ["+model=ling_mini"], check=False)
    assert proc.returncode != 0
    assert "needs at least" in proc.stderr and "GiB per process" in proc.stderr


@pytest.mark.distributed
def test_readme_demo_trains_with_falling_loss(tmp_path, monkeypatch):
    """The README's first command (after its install step), on the real built-in corpus."""
    demo = _readme_commands()[0].split("&&", 1)[1]
    args = shlex.split(demo)
    script = args.index("launch/pretrain.py")
    assert args[:script] == ["python"] and args[script + 1] == "--nproc-per-node", args
    nproc = int(args[script + 2])
    overrides = args[script + 3 :]
    monkeypatch.setenv("LING_PRETRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    run_pretrain(out, overrides, nproc=nproc, timeout=900)

    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 61))
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert all(r["mtp_loss"] is not None for r in records)
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000060"
    assert (out / "checkpoints" / "iter_0000060" / "metadata.json").is_file()


def test_model_info_prints_published_counts_and_flops():
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    out = subprocess.run(
        [sys.executable, "launch/model_info.py", "+model=ling_mini", "data.seq_length=4096"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["model"] == "ling_mini"
    assert round(info["total_params"] / 1e9, 2) == 16.26
    assert round(info["active_params"] / 1e9, 2) == 1.43
    assert info["mtp_params"] > 0
    # Megatron-LM's convention; 9.88e9 x 13.7k tokens/s/GPU is Ling's ~135 TFLOP/s/GPU.
    assert info["seq_length"] == 4096
    assert round(info["flops_per_token"] / 1e9, 2) == 9.88


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], "no model chosen: add +model=<preset>"),
        (["+model=ling_tiny", "trainer.max_step=5"], "did you mean trainer.max_steps?"),
        (["+model=ling_tiny", "fp8=blockwize"], "did you mean blockwise?"),
        (["+model=ling_tin"], "did you mean ling_tiny?"),
        (
            ["+model=ling_tiny", "data=indexed", "data.prefixes=[/x]", "data.eod_token_id=0"],
            "set data.seq_length<=1024",
        ),
    ],
    ids=["no-model", "misspelt-key", "misspelt-preset", "misspelt-model", "seq-too-long"],
)
def test_mistakes_end_in_one_message_with_the_fix(tmp_path, overrides, expected):
    proc = run_pretrain(tmp_path / "run", overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert "_schema" not in proc.stderr  # the schema entries are no presets to offer
    assert len(proc.stderr.strip().splitlines()) <= 8, proc.stderr


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "afile"
    target.write_text("mine")
    proc = run_pretrain(target, ["+model=ling_tiny"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run.output_dir={target} is a file" in proc.stderr
    assert target.read_text() == "mine"


@pytest.mark.distributed
def test_under_torchrun_a_config_error_is_printed_once(tmp_path):
    """Rank 0 prints it (not every rank), and torchrun's failure summary names it as the
    root cause instead of "To enable traceback ..."."""
    bad = ["+model=ling_tiny", "parallel.tensor_model_parallel_size=3"]
    proc = run_pretrain(tmp_path / "tr", bad, nproc=2, check=False)
    assert proc.returncode != 0
    ours, torchrun = proc.stderr.split("Traceback (most recent call last)", 1)
    assert ours.count("does not divide model.num_attention_heads=4") == 1
    root_cause = torchrun.split("Root Cause", 1)[1]
    assert "does not divide model.num_attention_heads=4" in root_cause
    assert "To enable traceback" not in proc.stderr


@pytest.mark.distributed
def test_nproc_per_node_validates_before_any_worker_starts(tmp_path):
    import subprocess
    import sys

    from tests.conftest import PRETRAIN, REPO, subprocess_env

    cmd = [
        sys.executable,
        str(PRETRAIN),
        "--nproc-per-node",
        "2",
        "+model=ling_tiny",
        "parallel.tensor_model_parallel_size=3",
        f"run.output_dir={tmp_path / 'np'}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.count("does not divide model.num_attention_heads=4") == 1
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
