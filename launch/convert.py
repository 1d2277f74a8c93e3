"""Convert between Hugging Face (BailingMoeV2) checkpoints and megatron checkpoints.

    # HF -> megatron, model taken from config.json, at layout TP1 (one process)
    python launch/convert.py hf-to-mcore --hf-dir /ckpt/Ling-mini-base-2.0 --out-dir /ckpt/mini_mcore
    # ... checked against a preset, built at TP2 (run with the layout's world size)
    torchrun --nproc-per-node 2 launch/convert.py hf-to-mcore --hf-dir D --out-dir O --tp 2 \\
        +model=ling_mini model.rotary_base=10000
    # ... a checkpoint without MTP into a model with MTP (the MTP layer starts fresh)
    python launch/convert.py hf-to-mcore --hf-dir D --out-dir O --init-missing-mtp \\
        model.mtp_num_layers=1

    # megatron -> HF (bf16, fp32 or fp8), tokenizer and modeling code copied from a template
    python launch/convert.py mcore-to-hf --checkpoint runs/x/checkpoints --out-dir /ckpt/x_hf \\
        --dtype bf16 --template-dir /ckpt/Ling-mini-base-2.0

A megatron checkpoint loads at any layout, so the layout of the conversion only decides how
the work (and the memory) is spread; the result is the same. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys

from ling_pretrain.convert import ConvertLayout, hf_to_mcore, mcore_to_hf
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.log import setup_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def overwrite(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help=f"replace a previous {what} in --out-dir: only the files it wrote are replaced, "
            "nothing else in the directory is touched (without it a previous one is refused; "
            "a directory holding anything else is always refused)",
        )

    def layout(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("parallel layout (run under torchrun with TP x PP x DP processes)")
        g.add_argument("--tp", type=int, default=1, help="tensor parallel size")
        g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        g.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
        g.add_argument("--ep", type=int, default=1, help="expert parallel size")
        g.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")

    a = sub.add_parser(
        "hf-to-mcore",
        help="HF safetensors -> megatron checkpoint (weights only)",
        description="Extra arguments are config overrides: +model=<preset> checks config.json "
        "against that preset; without it the model is derived from config.json.",
    )
    a.add_argument("--hf-dir", required=True, help="HF checkpoint directory")
    a.add_argument("--out-dir", required=True, help="megatron save_dir to write")
    a.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="params dtype of the megatron checkpoint (default: config.json dtype or torch_dtype)",
    )
    a.add_argument(
        "--init-missing-mtp",
        action="store_true",
        help="the checkpoint has no MTP layer but the model has (e.g. +model=ling_mini or "
        "model.mtp_num_layers=1): load every other tensor, keep the MTP layer freshly "
        "initialised",
    )
    overwrite(a, "conversion")
    layout(a)

    b = sub.add_parser(
        "mcore-to-hf",
        help="megatron checkpoint -> HF safetensors (bf16, fp32 or fp8)",
        description="Extra arguments are config overrides; the model is read from the run's "
        "config.yaml next to the checkpoint, or given with +model=<preset>.",
    )
    b.add_argument("--checkpoint", required=True, help="iter_XXXXXXX dir or its save_dir")
    b.add_argument("--out-dir", required=True, help="HF directory to write")
    b.add_argument("--dtype", choices=("bf16", "fp32", "fp8"), default="bf16")
    b.add_argument("--template-dir", default=None, help="HF dir to copy tokenizer/code from")
    b.add_argument("--max-shard-gb", type=float, default=4.0, help="safetensors file size")
    b.add_argument(
        "--params-dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="dtype the checkpoint was trained in (default: from its config.yaml)",
    )
    overwrite(b, "export")
    layout(b)
    return parser


def main(argv: list[str]) -> None:
    args, overrides = _parser().parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise SystemExit(f"unknown option(s) {' '.join(unknown)}; see --help")
    setup_logging("INFO")
    layout = ConvertLayout(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    try:
        if args.command == "hf-to-mcore":
            hf_to_mcore(
                args.hf_dir,
                args.out_dir,
                layout=layout,
                dtype=args.dtype,
                init_missing_mtp=args.init_missing_mtp,
                overwrite=args.overwrite,
                overrides=overrides,
            )
        else:
            mcore_to_hf(
                args.checkpoint,
                args.out_dir,
                layout=layout,
                dtype=args.dtype,
                template_dir=args.template_dir,
                max_shard_gb=args.max_shard_gb,
                params_dtype=args.params_dtype,
                overwrite=args.overwrite,
                overrides=overrides,
            )
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
