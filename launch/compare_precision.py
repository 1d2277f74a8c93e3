"""Train one model on the same data without FP8 and with an FP8 recipe, and compare losses.

    python launch/compare_precision.py --recipe blockwise --steps 200 --nproc 2 \\
        --out-dir runs/precision -- +model=ling_tiny

Everything after ``--`` is passed to both runs of ``launch/pretrain.py`` (Hydra overrides).
Both runs start from one seed checkpoint and read the same samples. Where TransformerEngine
FP8 cannot run (no Hopper GPU with TE), the recipe is emulated (``fp8.emulate=true``).

Writes ``OUT/comparison.json`` (both loss curves, the final losses averaged over the last
``--last`` steps, and their relative gap) and ``OUT/comparison.png``, and prints the gap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from ling_pretrain.core.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"


def _can_run_te_fp8() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("transformer_engine") is not None
        and torch.cuda.get_device_capability(0) >= (9, 0)
    )


def _run(out: Path, nproc: int, overrides: list[str]) -> None:
    args = [str(PRETRAIN), f"run.output_dir={out}", *overrides]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})


def _losses(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def relative_gap(baseline: list[float], candidate: list[float], last: int) -> dict:
    """Final losses (mean of the last ``last`` values) and ``(candidate - baseline) / baseline``."""
    n = min(last, len(baseline), len(candidate))
    if n == 0:
        raise ValueError("no logged steps to compare")
    base = sum(baseline[-n:]) / n
    cand = sum(candidate[-n:]) / n
    return {
        "baseline_final": base,
        "candidate_final": cand,
        "relative_gap": (cand - base) / base,
        "averaged_steps": n,
    }


def _plot(path: Path, curves: dict[str, list[dict]], title: str, params_dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in curves.items():
        label = f"{'FP8 off' if name == 'bf16' else name} ({params_dtype} params)"
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    else:
        overrides = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe",
        default="blockwise",
        choices=["blockwise", "blockwise_fp8_params", "tensorwise", "mxfp8"],
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--last", type=int, default=20, help="steps averaged for the final loss")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--params-dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    if not any(o.startswith(("+model=", "model=")) for o in overrides):
        overrides = ["+model=ling_tiny", *overrides]

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    common = [
        *overrides,
        f"trainer.max_steps={args.steps}",
        f"trainer.params_dtype={args.params_dtype}",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=false",
    ]
    _run(out / "seed", 1, [*common, "checkpoint.seed_checkpoint=true"])
    init = f"checkpoint.init_from={out / 'seed' / 'checkpoints'}"
    emulate = [] if _can_run_te_fp8() else ["fp8.emulate=true"]
    runs = {"bf16": ["fp8=bf16"], args.recipe: [f"fp8={args.recipe}", *emulate]}
    curves = {}
    for name, extra in runs.items():
        _run(out / name, args.nproc, [*common, init, *extra])
        curves[name] = _losses(out / name)

    gap = relative_gap(
        [r["loss"] for r in curves["bf16"]], [r["loss"] for r in curves[args.recipe]], args.last
    )
    result = {
        "recipe": args.recipe,
        "emulated": bool(emulate),
        "steps": args.steps,
        "nproc": args.nproc,
        "params_dtype": args.params_dtype,
        "overrides": overrides,
        **gap,
        "curves": {
            k: [{"step": r["step"], "loss": r["loss"]} for r in v] for k, v in curves.items()
        },
    }
    atomic_write_json(out / "comparison.json", result)
    label = f"{args.recipe}{' (emulated)' if emulate else ''}"
    _plot(
        out / "comparison.png",
        curves,
        f"{label} vs FP8 off: final-loss gap {100 * gap['relative_gap']:+.3f}%",
        args.params_dtype,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
