"""The end of a run: the loss-curve plot beside ``metrics.jsonl`` and a summary of the run.

The plot is drawn from ``metrics.jsonl``, so after a resume it shows the whole run, not only
the last part.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ling_pretrain.checkpoint.dist import find_latest

logger = logging.getLogger(__name__)

PLOT = "loss.png"
"""The loss-curve plot's file name, next to ``metrics.jsonl``."""


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(records: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Loss, MTP loss and validation loss against the step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "loss"), ("mtp_loss", "MTP loss"), ("val_loss", "val loss")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            style = {"marker": "o", "ms": 3} if key == "val_loss" else {}
            ax.plot(steps, values, label=label, lw=1.2, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def summary(
    records: list[dict],
    *,
    first_step: int,
    last_step: int,
    tokens: int,
    seconds: float,
    files: dict[str, str],
) -> str:
    """The end-of-run summary: steps, first and last loss, tokens, time and where things are.

    Args:
        records: the whole run's metrics records (across resumes).
        first_step: the step this process started from.
        last_step: the step it ended at.
        tokens: tokens trained on in the whole run.
        seconds: wall time of this process's training.
        files: label -> path of what the run wrote (config, metrics, checkpoints, plot, ...).
    """
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    loss = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no loss logged"
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    if val:
        loss += f" (val {val[-1]:.4f})"
    lines = [
        f"run finished at step {last_step} ({last_step - first_step} steps this run, from "
        f"step {first_step}) in {seconds:.0f} s; {loss}; {tokens:,} tokens",
    ]
    width = max(len(k) for k in files) if files else 0
    lines += [f"  {label:<{width}}  {path}" for label, path in files.items()]
    return "\n".join(lines)


def finish(
    cfg: Any, output_dir: str, save_dir: str, first_step: int, state: Any, seconds: float
) -> None:
    """Rank 0: the loss-curve plot beside ``metrics.jsonl`` and the end-of-run summary."""
    records = read_records(os.path.join(output_dir, "metrics.jsonl"))
    files = {
        "config": os.path.join(output_dir, "config.yaml"),
        "metrics": os.path.join(output_dir, "metrics.jsonl"),
    }
    if cfg.logging.tensorboard:
        files["tensorboard"] = os.path.join(output_dir, "tensorboard")
    latest = find_latest(save_dir)
    if latest is not None:
        files["checkpoints"] = f"{save_dir} (latest: {os.path.basename(latest)})"
    if records:
        try:
            files["plot"] = str(plot_losses(records, os.path.join(output_dir, PLOT), cfg.run.name))
        except Exception:  # a plot is not worth failing a finished run for
            logger.warning("could not draw %s", PLOT, exc_info=True)
    files["log"] = os.path.join(output_dir, "pretrain.log")
    logger.info(
        summary(
            records,
            first_step=first_step,
            last_step=state.step,
            tokens=state.tokens,
            seconds=seconds,
            files=files,
        )
    )
