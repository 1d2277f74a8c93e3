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
    nproc = int(args[args.index("--nproc-per-node") + 1])
    overrides = args[args.index("launch/pretrain.py") + 1 :]
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


def test_model_info_prints_published_counts():
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    out = subprocess.run(
        [sys.executable, "launch/model_info.py", "+model=ling_mini"],
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
