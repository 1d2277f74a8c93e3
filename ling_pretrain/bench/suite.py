"""Benchmark suites (``launch/benchmark.py suite``): the points of ``conf/benchmark/NAME.yaml``,
each a job of its own, collected into one directory.

Each point is validated first (layout, memory fit, FP8 hardware); one that cannot run is
reported as refused, with the reason, and the suite goes on. The others run here, one
process group each (``launch/benchmark.py run`` under torchrun), or are submitted to Slurm
through ``launch/slurm/pretrain.sbatch`` and collected later from their ``metrics.jsonl``
(``--collect``). The output directory holds, per point, ``<name>.json`` and its run under
``runs/<name>/``, and for the suite ``suite.json``, ``table.md`` (with the published figure
and the ratio beside each measured one) and ``chart.png``. It follows
:mod:`ling_pretrain.core.outputs`: claimed before any work, and nothing in it that the suite
did not write is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ling_pretrain.bench.throughput import (
    RESULT,
    RUN_DIR,
    describe,
    job_overrides,
    read_result,
    summarize,
)
from ling_pretrain.config import CONF_DIR, compose_job
from ling_pretrain.config.schema import BenchmarkPoint, BenchmarkSuite
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.io import atomic_write_json, atomic_write_text
from ling_pretrain.core.outputs import OutputDir, claim_dir, read_manifest, start_in_place

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "launch" / "benchmark.py"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "pretrain.sbatch"
SUITE_DIR = CONF_DIR / "benchmark"
KIND = "benchmark suite"
SUITE_FILES = ("suite.json", "table.md", "chart.png", "runs", "logs")


def suite_names() -> list[str]:
    """The suites shipped in ``conf/benchmark/``."""
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def load_suite(name: str) -> BenchmarkSuite:
    """``conf/benchmark/<name>.yaml`` checked against :class:`BenchmarkSuite`.

    Raises:
        ConfigError: no such suite (naming the valid ones), or a field is wrong.
    """
    from omegaconf.errors import OmegaConfBaseException

    path = SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no benchmark suite {name!r}; the suites are: {', '.join(suite_names())} "
            "(conf/benchmark/)."
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchmarkSuite), OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}") from None
    suite = OmegaConf.to_object(merged)
    names = [p.name for p in suite.points]
    dup = sorted({n for n in names if names.count(n) > 1})
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if dup or bad:
        raise ConfigError(f"{path}: point names must be unique file names ({dup or bad}).")
    return suite


def processes(suite: BenchmarkSuite, point: BenchmarkPoint) -> tuple[int, int]:
    """(nodes, processes per node) of a point."""
    return point.nodes, point.processes_per_node or suite.processes_per_node


def point_overrides(
    suite: BenchmarkSuite, point: BenchmarkPoint, extra: Sequence[str] = ()
) -> list[str]:
    """The job's overrides: the suite's common ones, the point's, then the user's extra ones."""
    return [*suite.common, *point.overrides, *extra]


def _target_hardware(suite: BenchmarkSuite, slurm: bool, local_processes: int):
    from ling_pretrain.jobs.validate import Hardware
    from ling_pretrain.memory.breakdown import GIB

    if slurm and suite.device_memory_gib:
        cc = tuple(suite.compute_capability)
        return Hardware("cuda", int(suite.device_memory_gib * GIB), True, (cc[0], cc[1]))
    return Hardware.detect(local_processes)


def check_point(
    suite: BenchmarkSuite, point: BenchmarkPoint, extra: Sequence[str], slurm: bool
) -> tuple[Any, str | None]:
    """(composed config or None, the reason the point cannot run or None)."""
    from ling_pretrain.jobs.validate import validate

    nodes, per_node = processes(suite, point)
    if nodes > 1 and not slurm:
        return None, f"needs {nodes} nodes: run the suite with --slurm on a cluster"
    try:
        cfg = compose_job(point_overrides(suite, point, extra))
        validate(cfg, nodes * per_node, _target_hardware(suite, slurm, per_node))
    except ConfigError as err:
        return None, " ".join(str(err).split())
    return cfg, None


def _base_result(suite_name: str, point: BenchmarkPoint, suite: BenchmarkSuite) -> dict:
    nodes, per_node = processes(suite, point)
    return {
        "suite": suite_name,
        "name": point.name,
        "row": point.row or point.name,
        "nodes": nodes,
        "processes_per_node": per_node,
        "published_tokens_per_sec": point.published_tokens_per_sec,
    }


def _launch_cmd(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(BENCHMARK), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(BENCHMARK),
        *args,
    ]


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error:" in ln]
    return (errors[-1] if errors else (lines[-1] if lines else "no output"))[:500]


def _run_local(
    out: Path, suite: BenchmarkSuite, point: BenchmarkPoint, overrides: list[str], timeout: int
) -> dict:
    _, nproc = processes(suite, point)
    run_dir = out / "runs" / point.name
    log = out / "logs" / f"{point.name}.log"
    args = [
        "run",
        f"--warmup={suite.warmup_steps}",
        f"--steps={suite.steps}",
        f"--out-dir={run_dir}",
        "--",
        *overrides,
    ]
    cmd = _launch_cmd(nproc, args)
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout} s (log: {log})"}
    result: dict[str, Any] = {"wall_s": time.perf_counter() - started, "log": str(log)}
    if proc.returncode != 0 or not (run_dir / RESULT).is_file():
        return {**result, "status": "failed", "reason": _last_error(log)}
    return {**result, "status": "ok", **read_result(run_dir / RESULT)}


def _submit(
    out: Path,
    suite: BenchmarkSuite,
    point: BenchmarkPoint,
    overrides: list[str],
    sbatch_script: Path,
) -> dict:
    nodes, per_node = processes(suite, point)
    cmd = [
        "sbatch",
        "--parsable",
        "-N",
        str(nodes),
        f"--gpus-per-node={per_node}",
        f"--job-name=bench-{point.name}",
        str(sbatch_script),
        *overrides,
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return {"status": "failed", "reason": "sbatch not found: --slurm needs a Slurm login node"}
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip()[-500:]
        return {"status": "failed", "reason": f"sbatch failed: {reason}", "command": cmd}
    job = re.search(r"\d+", proc.stdout)
    return {"status": "submitted", "job_id": job.group(0) if job else None, "command": cmd}


def _collect(out: Path, result: dict, warmup: int, steps: int) -> dict:
    """A submitted point's figures from its run's ``metrics.jsonl``, once it has them all."""
    from ling_pretrain.train.report import read_records

    records = read_records(out / "runs" / result["name"] / RUN_DIR / "metrics.jsonl")
    if len(records) < warmup + steps:
        return {
            **result,
            "status": "submitted",
            "reason": f"{len(records)} of {warmup + steps} steps in metrics.jsonl so far",
        }
    result = {k: v for k, v in result.items() if k != "reason"}
    return {**result, "status": "ok", **summarize(records, warmup)}


def _median(result: dict, key: str) -> float | None:
    value = result.get(key)
    return value["median"] if isinstance(value, dict) else None


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    """The Markdown table of a suite: one row per point, the published figure and the ratio
    of the measured one to it beside it; a refused or failed point shows why."""
    lines = [
        "| point | model | devices | GBS | status | step time s (p10-p90) | tokens/s | "
        "tokens/s/device | TFLOP/s/device | MFU | peak memory GiB | published tokens/s | "
        "ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        published = r.get("published_tokens_per_sec")
        tps = _median(r, "tokens_per_sec")
        if r.get("status") == "ok":
            st = r["step_time"]
            step = f"{st['median']:.3f} ({st['p10']:.3f}-{st['p90']:.3f})"
            memory = _fmt((r.get("max_memory_bytes") or 0) / 2**30, ".1f")
            status = "ok"
        else:
            step = memory = ""
            status = r.get("status", "?") + (f": {r['reason']}" if r.get("reason") else "")
        status = status.replace("|", "\\|")
        mfu = _median(r, "mfu")
        cells = [
            r["name"],
            r.get("row", ""),
            str(r.get("devices") or r["nodes"] * r["processes_per_node"]),
            str(r.get("global_batch_size", "")),
            status,
            step,
            _fmt(tps, ",.0f"),
            _fmt(_median(r, "tokens_per_sec_per_device"), ",.0f"),
            _fmt(_median(r, "tflops_per_device"), ".3g"),
            "" if mfu is None else f"{mfu:.1%}",
            memory,
            _fmt(published, ",.0f"),
            f"{tps / published:.2f}" if tps and published else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: list[dict], path: Path, title: str) -> None:
    """Bar chart of tokens/s per device, measured and (where there is one) published."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["name"] for r in results]
    ours = [_median(r, "tokens_per_sec_per_device") or 0.0 for r in results]
    published = [
        (r["published_tokens_per_sec"] / (r.get("devices") or r["nodes"] * r["processes_per_node"]))
        if r.get("published_tokens_per_sec")
        else 0.0
        for r in results
    ]
    y = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(results) + 1.5))
    ax.barh(y - 0.2, ours, height=0.4, label="measured")
    if any(published):
        ax.barh(y + 0.2, published, height=0.4, label="published")
    for i, r in enumerate(results):
        if r.get("status") != "ok":
            ax.text(0, i - 0.2, f"  {r.get('status')}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s per device")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_summary(out: Path, name: str, suite: BenchmarkSuite, results: list[dict]) -> None:
    for r in results:
        atomic_write_json(out / f"{r['name']}.json", r)
    atomic_write_json(
        out / "suite.json",
        {
            "suite": name,
            "description": suite.description,
            "warmup_steps": suite.warmup_steps,
            "steps": suite.steps,
            "points": results,
        },
    )
    atomic_write_text(out / "table.md", f"# Benchmark suite {name}\n\n" + table(results))
    chart(results, out / "chart.png", f"{name}: tokens/s per device")


def _files(suite: BenchmarkSuite) -> list[str]:
    return [*SUITE_FILES, *(f"{p.name}.json" for p in suite.points)]


def run_suite(
    name: str,
    out_dir: str | os.PathLike,
    *,
    slurm: bool = False,
    overwrite: bool = False,
    extra: Sequence[str] = (),
    timeout: int = 3600,
    sbatch_script: str | os.PathLike | None = None,
    budget_s: float | None = None,
    log: Any = print,
) -> list[dict]:
    """Run (or, with ``slurm``, submit) every point of suite ``name`` into ``out_dir``.

    Args:
        name: ``conf/benchmark/<name>.yaml``.
        out_dir: new, empty, or a previous output of this suite kind (replaced with
            ``overwrite``, only the files it wrote).
        slurm: submit each point with ``sbatch`` instead of running it here.
        overwrite: replace a previous suite output in ``out_dir``.
        extra: Hydra overrides added to every point (e.g. the data to read).
        timeout: seconds one local point may take.
        sbatch_script: the batch script (default ``launch/slurm/pretrain.sbatch``).
        budget_s: stop starting local points after this many seconds (the rest are
            reported as skipped).
        log: where progress lines go.

    Returns:
        One result per point (status ``ok``, ``refused``, ``failed``, ``submitted`` or
        ``skipped``).
    """
    suite = load_suite(name)
    script = Path(sbatch_script) if sbatch_script else SBATCH_SCRIPT
    if slurm and not script.is_file():
        raise ConfigError(
            f"{script} does not exist: --slurm submits every point through it "
            "(sbatch -N <nodes> --gpus-per-node=<G> pretrain.sbatch <overrides>)."
        )
    claim = claim_dir(out_dir, KIND, overwrite=overwrite)
    out = start_in_place(claim, _files(suite)).absolute()
    (out / "runs").mkdir()
    (out / "logs").mkdir()
    started = time.perf_counter()
    results = []
    for point in suite.points:
        result = _base_result(name, point, suite)
        cfg, refused = check_point(suite, point, extra, slurm)
        if cfg is not None:
            result.update(describe(cfg, processes(suite, point)[0] * processes(suite, point)[1]))
        overrides = [
            *point_overrides(suite, point, extra),
            *job_overrides(suite.warmup_steps, suite.steps, out / "runs" / point.name / RUN_DIR),
        ]
        if refused:
            result.update(status="refused", reason=refused)
        elif budget_s is not None and time.perf_counter() - started > budget_s:
            result.update(status="skipped", reason=f"over the {budget_s:.0f} s budget")
        elif slurm:
            (out / "runs" / point.name).mkdir()
            result.update(_submit(out, suite, point, overrides, script))
        else:
            result.update(
                _run_local(out, suite, point, point_overrides(suite, point, extra), timeout)
            )
        log(
            f"{point.name}: {result['status']}"
            + (f" ({result['reason']})" if result.get("reason") else "")
        )
        results.append(result)
        _write_summary(out, name, suite, results)
    return results


def collect_suite(name: str, out_dir: str | os.PathLike) -> list[dict]:
    """Summarise the submitted points of a ``--slurm`` suite output from their runs'
    ``metrics.jsonl`` and rewrite its results, table and chart.

    Raises:
        ConfigError: ``out_dir`` is not an output of this suite.
    """
    suite = load_suite(name)
    out = Path(out_dir).absolute()
    manifest = read_manifest(out)
    if manifest is None or manifest.get("kind") != KIND or not (out / "suite.json").is_file():
        raise ConfigError(f"{out} is not the output of a benchmark suite (no suite.json).")
    written = json.loads((out / "suite.json").read_text())
    if written.get("suite") != name:
        raise ConfigError(f"{out} holds suite {written.get('suite')!r}, not {name!r}.")
    results = [
        _collect(out, r, suite.warmup_steps, suite.steps) if r["status"] == "submitted" else r
        for r in written["points"]
    ]
    # The directory is already this suite's: record the same files (nothing is removed).
    start_in_place(OutputDir(out, KIND), sorted(set(manifest["files"]) | set(_files(suite))))
    _write_summary(out, name, suite, results)
    return results
