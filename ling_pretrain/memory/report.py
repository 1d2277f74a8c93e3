"""The printed memory report of ``launch/memory.py``: Ling's FP8 memory features switched on
one after another, then the config as given split by parameter class (GiB per GPU)."""

from __future__ import annotations

from typing import Any

from ling_pretrain.memory.breakdown import (
    CLASSES,
    ITEMS,
    fp8_feature_ladder,
    memory_breakdown,
)

GIB = 1024**3
HEADERS = {
    "weights": "weights",
    "fp8_weights": "FP8 copy",
    "fp8_transposes": "FP8 transp.",
    "main_grads": "grads fp32",
    "master_weights": "master fp32",
    "optimizer_states": "Adam states",
}
CLASS_NAMES = {
    "routed_experts": "routed experts",
    "non_expert_gemm": "non-expert FP8-GEMM weights",
    "non_expert_other": "other (embedding, lm_head, router, norms)",
}


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _row(label: str, width: int, states: Any, extra: list[str]) -> str:
    cells = [f"{_gib(getattr(states, item)):>13}" for item in ITEMS]
    cells.append(f"{_gib(states.total):>8}")
    return (f"{label:<{width}}" + "".join(cells) + "".join(f"{e:>10}" for e in extra)).rstrip()


def _header(first: str, width: int, extra: list[str]) -> str:
    cells = [f"{HEADERS[item]:>13}" for item in ITEMS] + [f"{'total':>8}"]
    return f"{first:<{width}}" + "".join(cells) + "".join(f"{e:>10}" for e in extra)


def _stage_note(b: Any) -> str:
    if len(b.stage_totals) == 1:
        return ""
    stages = ", ".join(_gib(t) for t in b.stage_totals)
    return (
        f"; pipeline rank {b.pipeline_rank} (largest; ranks 0..{len(b.stage_totals) - 1}: {stages})"
    )


def render(cfg: Any, world_size: int, ladder: list[Any], own: Any) -> str:
    """The printed report: the FP8 feature ladder, then ``own`` (the config as given) by class."""
    lay = own.layout
    lines = [
        f"{cfg.model.name} on {world_size} GPUs: TP={lay.tp} PP={lay.pp} EP={lay.ep} "
        f"ETP={lay.etp} CP={lay.cp} -> DP={lay.dp}, expert DP={lay.expert_dp}; "
        f"params_dtype={own.settings.params_dtype}, distributed optimizer "
        f"{'on' if own.settings.use_distributed_optimizer else 'off'}",
        "Model states per GPU in GiB (activations and temporary buffers not included).",
        "",
        "FP8 memory features, cumulative:",
    ]
    width = max(len(s.label) for s in ladder) + 2
    pipelined = lay.pp > 1
    lines.append(_header("", width, ["saves", "PP rank"] if pipelined else ["saves"]))
    for step in ladder:
        extra = ["" if step is ladder[0] else _gib(step.saving)]
        if pipelined:
            extra.append(str(step.breakdown.pipeline_rank))
        lines.append(_row(step.label, width, step.breakdown.states, extra))
    total = ladder[0].breakdown.total - ladder[-1].breakdown.total
    lines.append(
        f"all features save {_gib(total)} GiB ({total / 1e9:.2f} GB) per GPU against the first row."
    )

    st = own.settings
    lines += [
        "",
        f"This config: fp8.recipe={st.recipe}, FP8 primary weights "
        f"{'on' if st.fp8_primary_weights else 'off'}, on-demand transpose "
        f"{'on' if st.on_demand_transpose else 'off'}, optimizer {st.optimizer}"
        f"{_stage_note(own)}",
    ]
    width = max(len(n) for n in CLASS_NAMES.values()) + 2
    lines.append(_header("parameter class", width, ["params"]))
    for c in CLASSES:
        n = own.local_params[c]
        lines.append(_row(CLASS_NAMES[c], width, own.by_class[c], [f"{n / 1e6:.1f}M"]))
    n = sum(own.local_params.values())
    lines.append(_row("total", width, own.states, [f"{n / 1e6:.1f}M"]))
    lines.append(f"total {own.total / 1e9:.2f} GB = {_gib(own.total)} GiB per GPU.")
    return "\n".join(lines)


def memory_report(
    cfg: Any,
    world_size: int,
    *,
    optimizer: str | None = None,
    on_demand_transpose: bool | None = None,
) -> tuple[str, dict, list[str]]:
    """The report as text, its figures (bytes) as a JSON-ready dict, and notes for stderr.

    Raises:
        ValueError: the layout does not fit the world size or the model, or the settings
            contradict each other.
    """
    ladder = fp8_feature_ladder(cfg, world_size)
    own = memory_breakdown(
        cfg, world_size, optimizer=optimizer, on_demand_transpose=on_demand_transpose
    )
    figures = {
        "model": cfg.model.name,
        "world_size": world_size,
        "ladder": [{"step": s.label, "saving": s.saving, **s.breakdown.as_dict()} for s in ladder],
        "config": own.as_dict(),
    }
    notes = []
    if own.settings.params_dtype != "bf16":
        notes.append(
            f"note: trainer.params_dtype={own.settings.params_dtype}; Ling trains with "
            "trainer.params_dtype=bf16."
        )
    return render(cfg, world_size, ladder, own), figures, notes
