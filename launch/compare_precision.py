"""Train one model on the same data without FP8 and with an FP8 recipe, and compare losses.

    # on CPU (FP8 emulated; fp32 parameters, since bf16 runs ~10x slower on CPUs): ~3 minutes
    python launch/compare_precision.py --recipe blockwise --steps 40 --params-dtype fp32 \\
        --out-dir runs/precision_cpu -- +model=ling_tiny
    # on a Hopper GPU with TransformerEngine (real FP8 GEMMs), as Ling trains: bf16 parameters
    python launch/compare_precision.py --recipe blockwise --steps 2000 --nproc 8 \\
        --out-dir runs/precision -- +model=ling_mini ...

Everything after ``--`` is passed to both runs of ``launch/pretrain.py`` (Hydra overrides).
Both runs start from one seed checkpoint and read the same samples. Where TransformerEngine
FP8 cannot run (no Hopper GPU with TE), the recipe is emulated (``fp8.emulate=true``).

Writes ``OUT/comparison.json`` (both loss curves, the final losses averaged over the last
``--last`` steps, and their relative gap) and ``OUT/comparison.png`` (the curves), with the
runs in ``OUT/seed``, ``OUT/bf16`` and ``OUT/<recipe>``, and prints the gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ling_pretrain.bench.precision import compare_precision
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.recipes import FP8_RECIPE_NAMES


def main(argv: list[str]) -> None:
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1 :]
    else:
        overrides = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="blockwise", choices=FP8_RECIPE_NAMES)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--last", type=int, default=20, help="steps averaged for the final loss")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument(
        "--params-dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="parameter dtype of both runs (bf16: Ling's; use fp32 on CPU, where bf16 is slow)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous comparison in --out-dir (only the files it wrote)",
    )
    args = parser.parse_args(argv)
    try:
        summary = compare_precision(
            recipe=args.recipe,
            steps=args.steps,
            out_dir=args.out_dir,
            nproc=args.nproc,
            last=args.last,
            params_dtype=args.params_dtype,
            overwrite=args.overwrite,
            overrides=overrides,
        )
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out_dir / 'comparison.json'} and {args.out_dir / 'comparison.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
