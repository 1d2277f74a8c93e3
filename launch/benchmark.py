"""Throughput benchmarks: one point, a suite of points, the trainer's overhead, the GPU check.

    # one point in this process group (torchrun for several), warm-up steps excluded
    python launch/benchmark.py run --warmup 3 --steps 10 --out-dir runs/bench/tiny -- \\
        +model=ling_tiny data=mock data.seq_length=64
    # the points of conf/benchmark/NAME.yaml, each in a process of its own, or on Slurm
    python launch/benchmark.py suite cpu_smoke --out-dir runs/bench/cpu_smoke
    python launch/benchmark.py suite ling_v2_table --out-dir /shared/bench/ling_v2 --slurm
    python launch/benchmark.py suite ling_v2_table --out-dir /shared/bench/ling_v2 --collect
    # our training step against a bare megatron-core loop (CPU), last line JSON
    python launch/benchmark.py overhead -- +model=ling_tiny data=mock
    # one GPU, under 8 minutes: ling_mini and Llama-3.1-8B with 4 layers, FP8 emulation's cost
    python launch/benchmark.py gpu-check --out-dir runs/bench/gpu_check

Everything after ``--`` is a Hydra override of the job (``suite`` adds them to every point).
``run`` prints its result as one JSON object; ``suite`` writes one JSON per point,
``table.md`` and ``chart.png`` into ``--out-dir`` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.log import setup_logging


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one point in this process group")
    run.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    run.add_argument("--steps", type=int, default=10, help="timed steps")
    run.add_argument("--out-dir", required=True, help="where result.json and the run go")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run there")
    suite = sub.add_parser("suite", help="the points of conf/benchmark/NAME.yaml")
    suite.add_argument("name")
    suite.add_argument("--out-dir", required=True)
    suite.add_argument("--overwrite", action="store_true", help="replace a previous suite there")
    mode = suite.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="submit each point with sbatch")
    mode.add_argument(
        "--collect", action="store_true", help="summarise the submitted points' finished runs"
    )
    suite.add_argument("--timeout", type=int, default=3600, help="seconds per local point")
    suite.add_argument("--sbatch-script", default=None, help="default launch/slurm/pretrain.sbatch")
    over = sub.add_parser("overhead", help="our step against a bare megatron-core loop")
    over.add_argument("--steps-per-block", type=int, default=5)
    over.add_argument("--blocks", type=int, default=6)
    gpu = sub.add_parser("gpu-check", help="one GPU, under 8 minutes")
    gpu.add_argument("--out-dir", required=True)
    gpu.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str]) -> None:
    argv, overrides = _split(argv)
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "run":
            from ling_pretrain.bench.throughput import run_point

            result = run_point(
                overrides,
                out_dir=args.out_dir,
                warmup=args.warmup,
                steps=args.steps,
                overwrite=args.overwrite,
            )
            if result is not None:
                print(json.dumps(result, indent=2))
        elif args.command == "suite":
            from ling_pretrain.bench.suite import collect_suite, run_suite

            if args.collect:
                results = collect_suite(args.name, args.out_dir)
            else:
                results = run_suite(
                    args.name,
                    args.out_dir,
                    slurm=args.slurm,
                    overwrite=args.overwrite,
                    extra=overrides,
                    timeout=args.timeout,
                    sbatch_script=args.sbatch_script,
                )
            counts = {
                s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}
            }
            print(f"wrote {args.out_dir}/table.md and chart.png: {json.dumps(counts)}")
        elif args.command == "overhead":
            from ling_pretrain.bench.overhead import measure_overhead

            result = measure_overhead(
                overrides, steps_per_block=args.steps_per_block, blocks=args.blocks
            )
            if os.environ.get("RANK", "0") == "0":
                print(json.dumps(result))
        else:
            from ling_pretrain.bench.gpu_check import gpu_check

            print(json.dumps(gpu_check(args.out_dir, overwrite=args.overwrite), indent=2))
    except ConfigError as err:
        from ling_pretrain.train.cli import exit_with_config_error

        exit_with_config_error(err)


if __name__ == "__main__":
    main(sys.argv[1:])
