"""Evaluate a checkpoint (Hugging Face or megatron): LM loss, MTP loss, perplexity, logits.

    # an HF directory; the model comes from its config.json
    python launch/evaluate.py --checkpoint /ckpt/Ling-mini-base-2.0 --tokens ids.npy
    # a run's megatron checkpoint (model from the run's config.yaml), logits saved
    python launch/evaluate.py --checkpoint runs/ling_tiny/checkpoints --tokens ids.npy \\
        --save-logits logits.npz
    # a tokenized corpus, at a parallel layout (run with the layout's world size)
    torchrun --nproc-per-node 2 launch/evaluate.py --checkpoint C --data /data/corpus_text_document \\
        --seq-length 4096 --num-batches 16 parallel.tensor_model_parallel_size=2 \\
        parallel.sequence_parallel=true

--tokens takes a .npy array of token ids [num_sequences, seq_length] (a 1-d stream is cut into
rows of --seq-length). Position i is scored on token i + 1 and MTP position i on token i + 2.
The results are printed as JSON and written to --output; --save-logits writes fp32 `logits`
and `mtp_logits` [num_sequences, seq_length, vocab] to an .npz file. Any config field can be
overridden after the options (e.g. trainer.params_dtype=fp32, +model=ling_mini to check an HF
config.json against a preset).
"""

from __future__ import annotations

import argparse
import sys

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.log import setup_logging
from ling_pretrain.eval.run import EvalRequest, run_evaluation


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="HF directory or megatron checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help=".npy file of token ids [num_sequences, seq_length]")
    src.add_argument("--data", help="prefix of a megatron .bin/.idx dataset")
    p.add_argument("--save-logits", help="write fp32 logits and mtp_logits to this .npz")
    p.add_argument("--output", default="evaluate.json", help="JSON results file")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (--data: default 2048)")
    p.add_argument(
        "--num-batches",
        type=int,
        help="evaluate at most this many batches (--data: exactly this many, default 1)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args, overrides = _parser().parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        raise SystemExit(f"unknown option(s) {' '.join(unknown)}; see --help")
    setup_logging("WARNING")
    request = EvalRequest(**{k: v for k, v in vars(args).items()})
    try:
        run_evaluation(request, overrides)
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
