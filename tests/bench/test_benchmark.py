"""launch/benchmark.py: one point, suites (locally end to end, and on a fake Slurm), the
overhead measurement and the GPU check's refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ling_pretrain.bench.gpu_check import summarize_check
from ling_pretrain.bench.suite import (
    check_point,
    collect_suite,
    load_suite,
    run_suite,
    suite_names,
    table,
)
from ling_pretrain.bench.throughput import summarize
from ling_pretrain.config import CONF_DIR
from ling_pretrain.config.schema import BenchmarkPoint, BenchmarkSuite
from ling_pretrain.core.errors import ConfigError
from tests.conftest import REPO, subprocess_env

BENCHMARK = REPO / "launch" / "benchmark.py"
TINY_JOB = [
    "+model=ling_tiny",
    "data=mock",
    "data.seq_length=32",
    "data.num_workers=0",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=4",
    "trainer.params_dtype=fp32",
]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARK), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(n: int, step_time: float = 1.0) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 10.0 - s,
            "step_time": step_time * (3.0 if s == 1 else 1.0 + 0.01 * s),
            "data_wait_time": 0.01,
            "tokens_per_sec": 100.0 * s,
            "tokens_per_sec_per_device": 12.5 * s,
            "tflops_per_device": 0.1 * s,
            "mfu": 0.01 * s,
            "mfu_fp8": None,
            "max_memory_bytes": 2**30 * s,
            "max_memory_reserved_bytes": None,
        }
        for s in range(1, n + 1)
    ]


def test_summary_leaves_the_warmup_out():
    out = summarize(_records(12), warmup=2)
    assert out["timed_steps"] == 10
    assert out["step_time"]["max"] == pytest.approx(1.12)  # step 1's 3.0 s is warm-up
    assert out["tokens_per_sec"]["median"] == pytest.approx(750.0)  # steps 3..12
    assert out["tokens_per_sec"]["p10"] == pytest.approx(390.0)
    assert out["tokens_per_sec"]["p90"] == pytest.approx(1110.0)
    assert out["mfu_fp8"] is None
    assert out["max_memory_bytes"] == 12 * 2**30
    with pytest.raises(ValueError, match="no metrics record after the 12 warm-up steps"):
        summarize(_records(12), warmup=12)


def test_unknown_suite_and_model_name_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"no benchmark suite 'ling_v3'; the suites are: .*cpu_smoke"
    ):
        load_suite("ling_v3")
    proc = _cli("suite", "ling_v3", "--out-dir", "unused")
    assert proc.returncode == 2 and "cpu_smoke, gpu_check, ling_v2_table" in proc.stderr
    suite = BenchmarkSuite(points=[BenchmarkPoint(name="x", overrides=["+model=ling_tny"])])
    _, reason = check_point(suite, suite.points[0], [], slurm=False)
    assert "no preset 'ling_tny' (did you mean ling_tiny?)" in reason and "ling_mini" in reason


def test_every_shipped_suite_loads():
    assert suite_names() == sorted(p.stem for p in (CONF_DIR / "benchmark").glob("*.yaml"))
    for name in suite_names():
        assert load_suite(name).points, name


LING_TABLE = {  # Ling-V2 README, tokens/s of the job at 8 / 16 / 32 GPUs
    "llama31_8b": (81222, 161319, 321403),
    "qwen3_8b": (55775, 109799, 219943),
    "ling_mini": (109532, 221585, 448726),
    "ling_mini_no_mtp": (128298, 307264, 611466),
}


@pytest.mark.parametrize("model", list(LING_TABLE))
def test_ling_v2_table_points_are_lings_and_fit_80gb_gpus(model):
    suite = load_suite("ling_v2_table")
    points = [p for p in suite.points if p.name.rsplit("_", 1)[0] == model]
    assert [p.published_tokens_per_sec for p in points] == list(LING_TABLE[model])
    preset = points[0].overrides[0].split("=", 1)[1]
    if not (CONF_DIR / "model" / f"{preset}.yaml").exists():
        pytest.skip(f"preset {preset} is not in conf/model/ yet")
    for point, gpus, gbs in zip(points, (8, 16, 32), (128, 256, 512), strict=True):
        cfg, reason = check_point(suite, point, [], slurm=True)
        assert reason is None, (point.name, reason)
        assert point.nodes * suite.processes_per_node == gpus
        assert cfg.trainer.global_batch_size == gbs and cfg.data.seq_length == 4096
        assert cfg.fp8.recipe == "blockwise_fp8_params" and cfg.optimizer.optimizer == "adam8bit"
        if model.startswith("ling"):
            assert (cfg.model.mtp_num_layers == 1) == (model == "ling_mini")
            assert cfg.parallel.expert_model_parallel_size == 8
            assert cfg.parallel.moe_token_dispatcher_type == "flex"


def test_table_puts_the_published_figure_and_ratio_beside_each():
    ok = {
        "name": "a",
        "row": "A",
        "nodes": 1,
        "processes_per_node": 8,
        "devices": 8,
        "global_batch_size": 128,
        "status": "ok",
        "published_tokens_per_sec": 100_000.0,
        **summarize(_records(5, step_time=2.0), warmup=1),
    }
    refused = {
        "name": "b",
        "nodes": 2,
        "processes_per_node": 8,
        "status": "refused",
        "reason": "x | y does not fit",
        "published_tokens_per_sec": 5.0,
    }
    rows = table([ok, refused]).splitlines()
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[:5] == ["a", "A", "8", "128", "ok"]
    assert cells[6] == "350" and cells[-2:] == ["100,000", "0.00"]
    assert "refused: x \\| y does not fit" in rows[3] and "| 16 |" in rows[3]


@pytest.mark.distributed
def test_cpu_smoke_suite_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    proc = _cli("suite", "cpu_smoke", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = ["ling_tiny_1proc", "ling_tiny_no_mtp_dp2", "ling_tiny_ep3", "ling_mini_1proc"]
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    for name in names[:2]:
        r = results[name]
        assert r["status"] == "ok", r
        assert r["timed_steps"] == 3 and r["warmup_steps"] == 1
        s = r["step_time"]
        assert 0 < s["min"] <= s["p10"] <= s["median"] <= s["p90"] <= s["max"]
        assert r["tokens_per_sec"]["median"] > 0 and r["mfu"] is None  # no CPU peak
        assert r["max_memory_bytes"] > 0
    assert results["ling_tiny_no_mtp_dp2"]["devices"] == 2
    assert results["ling_tiny_no_mtp_dp2"]["mtp_num_layers"] == 0
    ep3, mini = results["ling_tiny_ep3"], results["ling_mini_1proc"]
    assert ep3["status"] == "refused" and "does not divide model.num_moe_experts=8" in ep3["reason"]
    assert mini["status"] == "refused" and "GiB per process" in mini["reason"]
    md = (out / "table.md").read_text()
    assert all(f"| {n} |" in md for n in names) and md.count("| ok |") == 2
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    suite = json.loads((out / "suite.json").read_text())
    assert [p["name"] for p in suite["points"]] == names
    # A second suite into the same directory must say so before any work.
    again = _cli("suite", "cpu_smoke", "--out-dir", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_suite_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = _cli("suite", "cpu_smoke", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_run_prints_one_json_and_overwrites_only_its_own_files(tmp_path):
    out = tmp_path / "point"
    args = ["run", "--warmup", "1", "--steps", "2", "--out-dir", str(out), "--", *TINY_JOB]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads((out / "result.json").read_text())
    assert printed["timed_steps"] == 2 and printed["model"] == "ling_tiny"
    assert set(printed["step_time"]) == {"median", "p10", "p90", "min", "max"}
    assert [r["step"] for r in map(json.loads, (out / "run" / "metrics.jsonl").open())] == [1, 2, 3]
    (out / "notes.txt").write_text("mine")
    assert _cli(*args).returncode == 2  # a previous run: only with --overwrite
    proc = _cli(*args[:1], "--overwrite", *args[1:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "notes.txt").read_text() == "mine"


def _fake_sbatch(tmp_path: Path) -> tuple[Path, Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.jsonl"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"with open({str(calls)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(4000 + sum(1 for _ in open(" + repr(str(calls)) + ")))\n"
    )
    sbatch.chmod(0o755)
    script = tmp_path / "pretrain.sbatch"
    script.write_text("#!/bin/bash\n")
    return bin_dir, calls, script


def test_slurm_submission_and_collection(tmp_path, monkeypatch):
    bin_dir, calls, script = _fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "ling_v2"
    results = run_suite("ling_v2_table", out, slurm=True, sbatch_script=script, log=lambda _: None)
    submitted = [r for r in results if r["status"] == "submitted"]
    assert {r["name"] for r in results if r["status"] == "refused"} <= {
        f"{m}_{g}gpu" for m in ("llama31_8b", "qwen3_8b") for g in (8, 16, 32)
    }
    assert len(submitted) >= 6
    argv = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(argv) == len(submitted)
    by_name = {r["name"]: (r, a) for r, a in zip(submitted, argv, strict=True)}
    result, args = by_name["ling_mini_16gpu"]
    assert result["job_id"] == str(4000 + argv.index(args) + 1)
    assert args[:4] == ["--parsable", "-N", "2", "--gpus-per-node=8"]
    i = args.index(str(script))
    overrides = args[i + 1 :]
    assert "+model=ling_mini" in overrides and "trainer.global_batch_size=256" in overrides
    assert "trainer.max_steps=30" in overrides and "checkpoint.save_at_end=false" in overrides
    assert f"run.output_dir={out.absolute()}/runs/ling_mini_16gpu/run" in overrides

    # One job finished: its metrics.jsonl is summarised, the others are still pending.
    run = out / "runs" / "ling_mini_16gpu" / "run"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for r in _records(30, step_time=1.2):
            f.write(json.dumps({**r, "tokens_per_sec": 262144 / 1.2}) + "\n")
    collected = {r["name"]: r for r in collect_suite("ling_v2_table", out)}
    done = collected["ling_mini_16gpu"]
    assert done["status"] == "ok" and done["timed_steps"] == 20
    assert collected["ling_mini_8gpu"]["status"] == "submitted"
    assert "0 of 30 steps" in collected["ling_mini_8gpu"]["reason"]
    md = (out / "table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ling_mini_16gpu |"))
    assert "218,453" in row and "221,585" in row and "| 0.99 |" in row
    assert json.loads((out / "ling_mini_16gpu.json").read_text())["status"] == "ok"


def test_slurm_needs_the_batch_script(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: --slurm submits every point"):
        run_suite("cpu_smoke", tmp_path / "x", slurm=True, sbatch_script=tmp_path / "none.sbatch")
    assert not (tmp_path / "x").exists()


def test_overhead_prints_the_ratio_last():
    proc = _cli("overhead", "--blocks", "2", "--steps-per-block", "1", "--", *TINY_JOB)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["overhead"] == pytest.approx(last["ours_step_s"] / last["bare_step_s"])
    assert last["overhead"] > 0 and len(last["block_ratios"]) == 2


def test_gpu_check_without_cuda_says_so_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    proc = _cli("gpu-check", "--out-dir", str(tmp_path / "gpu"))
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "not measured" in proc.stderr
    assert not (tmp_path / "gpu").exists()


def test_gpu_check_summary_and_emulation_cost():
    def point(name, step):
        return {
            "name": name,
            "status": "ok",
            "step_time": {"median": step},
            "tokens_per_sec_per_device": {"median": 4096 * 4 / step},
        }

    out = summarize_check(
        [
            point("ling_mini_4l_bf16", 2.0),
            point("ling_mini_4l_fp8_emulated", 5.0),
            {"name": "llama31_8b_4l_bf16", "status": "refused", "reason": "no preset"},
        ]
    )
    assert out["fp8_emulation_cost"] == pytest.approx(2.5)
    assert out["points"]["ling_mini_4l_bf16"]["tokens_per_sec_per_gpu"] == pytest.approx(8192)
    assert out["points"]["llama31_8b_4l_bf16"]["reason"] == "no preset"
    assert summarize_check([])["fp8_emulation_cost"] is None
