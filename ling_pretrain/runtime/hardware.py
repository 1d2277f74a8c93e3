"""What the machine offers one training process, and the settings that need more than that."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import metadata
from typing import Any


@dataclass(frozen=True)
class Hardware:
    """What the current machine offers one training process."""

    device: str
    """``cuda`` or ``cpu``."""
    memory_bytes: int
    """Memory available to one process: one GPU's memory, or host RAM divided by the
    processes on this node."""
    has_transformer_engine: bool
    """Whether ``transformer_engine`` can be imported."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability of device 0, when CUDA is present."""
    te_version: str | None = None
    """Installed TransformerEngine version (from package metadata), when known."""

    @staticmethod
    def detect(local_world_size: int = 1) -> Hardware:
        """Inspect this machine without initialising CUDA contexts on other devices."""
        import psutil
        import torch

        has_te = importlib.util.find_spec("transformer_engine") is not None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Hardware(
                "cuda", props.total_memory, has_te, (props.major, props.minor), te_version()
            )
        ram = psutil.virtual_memory().total // max(local_world_size, 1)
        return Hardware("cpu", ram, has_te)

    def on_gpu(self, cfg: Any) -> bool:
        """Whether a job with ``run.device`` runs on this machine's GPUs."""
        return self.device == "cuda" and cfg.run.device != "cpu"


def te_version() -> str | None:
    """The installed TransformerEngine version, from package metadata."""
    for dist in ("transformer_engine", "transformer-engine"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"2.6.0.post1"`` -> ``(2, 6, 0)``."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_hardware(cfg: Any, hw: Hardware, errors: list[str]) -> None:
    """Append every setting this machine cannot run (FP8 recipes: see ``fp8.checks``)."""
    p = cfg.parallel
    requested = cfg.run.device
    if requested not in ("auto", "cuda", "cpu"):
        errors.append(f"run.device={requested!r} must be 'auto', 'cuda' or 'cpu'.")
    if requested == "cuda" and hw.device != "cuda":
        errors.append("run.device=cuda but no CUDA device is visible; use run.device=auto.")
    on_gpu = hw.on_gpu(cfg)
    if p.context_parallel_size > 1 and not (on_gpu and hw.has_transformer_engine):
        errors.append(
            f"parallel.context_parallel_size={p.context_parallel_size} needs TransformerEngine "
            "on CUDA GPUs (only TE's attention supports context parallelism); set it to 1 here."
        )
    if p.moe_token_dispatcher_type == "flex" and not (on_gpu and hw.has_transformer_engine):
        errors.append(
            "parallel.moe_token_dispatcher_type=flex needs CUDA GPUs with DeepEP and "
            "TransformerEngine; use alltoall."
        )
    if cfg.optimizer.use_precision_aware_optimizer and not (on_gpu and hw.has_transformer_engine):
        errors.append(
            "optimizer.use_precision_aware_optimizer=true needs TransformerEngine's FusedAdam on "
            "CUDA GPUs; this machine has "
            + ("no CUDA device" if not on_gpu else "no importable transformer_engine")
            + ". Use optimizer=adam8bit for 8-bit moments without TE, or turn it off."
        )
