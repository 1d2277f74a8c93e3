"""The precision comparison command, run as a user would (few steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.distributed


def test_relative_gap_averages_the_last_steps():
    from ling_pretrain.bench.precision import relative_gap

    gap = relative_gap([4.0, 3.0, 2.0, 2.0], [4.0, 3.1, 2.2, 2.0], last=2)
    assert gap["baseline_final"] == 2.0 and gap["candidate_final"] == pytest.approx(2.1)
    assert gap["relative_gap"] == pytest.approx(0.05)
    with pytest.raises(ValueError):
        relative_gap([], [], last=3)


def test_compare_precision_writes_curves_plot_and_gap(tmp_path):
    out = tmp_path / "cmp"
    subprocess.run(
        [
            sys.executable,
            "launch/compare_precision.py",
            "--steps",
            "3",
            "--last",
            "2",
            "--params-dtype",
            "fp32",
            "--out-dir",
            str(out),
            "--",
            "+model=ling_tiny",
            "data=mock",
            "data.seq_length=32",
            "data.num_workers=0",
            "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4",
        ],
        cwd=REPO,
        env=subprocess_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads((out / "comparison.json").read_text())
    assert (out / "comparison.png").stat().st_size > 10_000
    base = [p["loss"] for p in result["curves"]["bf16"]]
    fp8 = [p["loss"] for p in result["curves"]["blockwise"]]
    assert len(base) == len(fp8) == 3
    assert base[0] != fp8[0], "the FP8 run must really quantise"
    assert abs(base[0] - fp8[0]) / base[0] < 0.01
    expected = (sum(fp8[-2:]) / 2 - sum(base[-2:]) / 2) / (sum(base[-2:]) / 2)
    assert result["relative_gap"] == pytest.approx(expected)
    assert result["emulated"] is True


def test_a_directory_it_did_not_write_is_refused_before_any_run(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "compare_precision.py"), "--out-dir", str(out)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not empty and is not a previous precision comparison" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
