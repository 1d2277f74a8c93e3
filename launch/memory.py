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
import sys

from ling_pretrain.config import compose_or_exit
from ling_pretrain.core.io import atomic_write_json
from ling_pretrain.memory.breakdown import OPTIMIZERS
from ling_pretrain.memory.report import memory_report


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
    cfg = compose_or_exit(args.overrides)
    try:
        text, figures, notes = memory_report(
            cfg,
            args.world_size,
            optimizer=args.optimizer,
            on_demand_transpose=True if args.on_demand_transpose else None,
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for note in notes:
        print(note, file=sys.stderr)
    print(text)
    if args.json:
        atomic_write_json(args.json, figures)


if __name__ == "__main__":
    main(sys.argv[1:])
