"""Print the per-GPU memory of a run's model states, and what each FP8 feature saves.

    python launch/memory.py +model=ling_mini parallel.expert_model_parallel_size=8 \\
        trainer.params_dtype=bf16 fp8.recipe=blockwise --world-size 8
    python launch/memory.py +model=ling_mini parallel.expert_model_parallel_size=8 \\
        trainer.params_dtype=bf16 --world-size 8 --optimizer adam8bit --json mem.json

Arguments other than the flags below are Hydra overrides of the training config, exactly as
``launch/pretrain.py`` takes them. Two tables are printed, in GiB per GPU: Ling's FP8 memory
features switched on one after another (the FP8 ones use the config's recipe, or blockwise
when the config has none), and the config as given split by parameter class. Only model
states are counted (weights, FP8 weight copies, gradients, master weights, optimizer
states), not activations; docs/memory.md lists every assumption.
"""

import argparse
import json
import sys
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ling_pretrain.config import compose
from ling_pretrain.fp8 import memory as _memory

CLASSES, ITEMS, OPTIMIZERS = _memory.CLASSES, _memory.ITEMS, _memory.OPTIMIZERS

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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +model=ling_mini")
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="optimizer of the 'this config' table (default: optimizer.optimizer)",
    )
    parser.add_argument(
        "--on-demand-transpose",
        action="store_true",
        help="count the config without TE's cached FP8 transposes for any recipe whose "
        "column-wise copy is a transpose (Ling's TE patch); default: fp8.on_demand_transpose "
        "where released TE can do it (blockwise recipe with FP8 primary weights)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures (bytes) as JSON")
    args = parser.parse_intermixed_args(argv)
    if not any(a.startswith(("+model=", "model=")) for a in args.overrides):
        parser.error("choose a model preset, e.g. +model=ling_mini")

    try:
        cfg = compose(args.overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise SystemExit(f"cannot compose the config: {err}") from None
    try:
        ladder = _memory.fp8_feature_ladder(cfg, args.world_size)
        own = _memory.memory_breakdown(
            cfg,
            args.world_size,
            optimizer=args.optimizer,
            on_demand_transpose=True if args.on_demand_transpose else None,
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if own.settings.params_dtype != "bf16":
        print(
            f"note: trainer.params_dtype={own.settings.params_dtype}; Ling trains with "
            "trainer.params_dtype=bf16.",
            file=sys.stderr,
        )
    print(render(cfg, args.world_size, ladder, own))
    if args.json:
        report = {
            "model": cfg.model.name,
            "world_size": args.world_size,
            "ladder": [
                {"step": s.label, "saving": s.saving, **s.breakdown.as_dict()} for s in ladder
            ],
            "config": own.as_dict(),
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
