"""Load a checkpoint at this run's layout and save it again at once, alone or under torchrun.

    python tests/optim/reshard_worker.py OUT_DIR [--legacy] [config overrides...]

The overrides name the checkpoint (``checkpoint.load_dir=...``) and the layout. Saving right
after loading, with no step in between, writes every tensor the load put into this layout's
shards back in the layout-free form (each parameter and its optimizer state at full shape),
so comparing the two checkpoints tests the resharding bit for bit.

``--legacy`` saves the optimizer state in megatron's ``dp_reshardable`` layout, as this
trainer did before its checkpoints became fully reshardable.
"""

from __future__ import annotations

import sys

from ling_pretrain.checkpoint.dist import save_checkpoint
from ling_pretrain.config import compose
from ling_pretrain.jobs.resume import choose_checkpoint
from ling_pretrain.jobs.validate import validate
from ling_pretrain.optim import checkpointing
from ling_pretrain.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    world_size_from_env,
)
from ling_pretrain.train.setup import setup


def main() -> None:
    out, *args = sys.argv[1:]
    if "--legacy" in args:
        args.remove("--legacy")
        checkpointing.SAVE_FORMAT = "dp_reshardable"
    cfg = compose(args)
    layout = validate(cfg, world_size_from_env())
    info = init_distributed(cfg)
    try:
        parts = setup(cfg, layout, info.device, out, choose_checkpoint(cfg))
        save_checkpoint(out, parts.state, parts.model, parts.optimizer, parts.scheduler, config=cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
