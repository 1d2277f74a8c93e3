"""Train one model on the same data without FP8 and with an FP8 recipe, and compare losses
(the ``launch/compare_precision.py`` command).

Both runs of ``launch/pretrain.py`` start from one seed checkpoint and read the same samples.
Where TransformerEngine FP8 cannot run (no Hopper GPU with TE), the recipe is emulated
(``fp8.emulate=true``). Writes ``OUT/comparison.json`` (both loss curves, the final losses
averaged over the last ``last`` steps, and their relative gap) and ``OUT/comparison.png``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ling_pretrain.core.io import atomic_write_json
from ling_pretrain.core.outputs import claim_dir, start_in_place

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "launch" / "pretrain.py"
KIND = "precision comparison"


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


def compare_precision(
    *,
    recipe: str,
    steps: int,
    out_dir: Path,
    nproc: int = 1,
    last: int = 20,
    params_dtype: str = "bf16",
    overwrite: bool = False,
    overrides: Sequence[str] = (),
) -> dict:
    """Run the seed, FP8-off and FP8 runs and write the comparison; returns its summary.

    ``out_dir`` must be new, empty, or a previous comparison (replaced with ``overwrite``;
    only the files it wrote).
    """
    overrides = list(overrides)
    if not any(o.startswith(("+model=", "model=")) for o in overrides):
        overrides = ["+model=ling_tiny", *overrides]
    claim = claim_dir(out_dir, KIND, overwrite=overwrite)
    names = ["seed", "bf16", recipe, "comparison.json", "comparison.png"]
    out = start_in_place(claim, names)
    common = [
        *overrides,
        f"trainer.max_steps={steps}",
        f"trainer.params_dtype={params_dtype}",
        "checkpoint.save_at_end=false",
        "checkpoint.resume=false",
    ]
    _run(out / "seed", 1, [*common, "checkpoint.seed_checkpoint=true"])
    init = f"checkpoint.init_from={out / 'seed' / 'checkpoints'}"
    emulate = [] if _can_run_te_fp8() else ["fp8.emulate=true"]
    runs = {"bf16": ["fp8=bf16"], recipe: [f"fp8={recipe}", *emulate]}
    curves = {}
    for name, extra in runs.items():
        _run(out / name, nproc, [*common, init, *extra])
        curves[name] = _losses(out / name)

    gap = relative_gap(
        [r["loss"] for r in curves["bf16"]], [r["loss"] for r in curves[recipe]], last
    )
    result = {
        "recipe": recipe,
        "emulated": bool(emulate),
        "steps": steps,
        "nproc": nproc,
        "params_dtype": params_dtype,
        "overrides": overrides,
        **gap,
        "curves": {
            k: [{"step": r["step"], "loss": r["loss"]} for r in v] for k, v in curves.items()
        },
    }
    atomic_write_json(out / "comparison.json", result)
    label = f"{recipe}{' (emulated)' if emulate else ''}"
    _plot(
        out / "comparison.png",
        curves,
        f"{label} vs FP8 off: final-loss gap {100 * gap['relative_gap']:+.3f}%",
        params_dtype,
    )
    return {k: v for k, v in result.items() if k != "curves"}
