"""Print a model configuration's parameter counts and training FLOPs per token as JSON.

    python launch/model_info.py +model=ling_mini data.seq_length=4096
    python launch/model_info.py +model=llama31_8b data.seq_length=4096
    python launch/model_info.py +model=ling_tiny model.num_layers=8

``total_params`` and ``active_params`` exclude the MTP layers, as the published figures do;
``mtp_params`` / ``mtp_active_params`` report them separately. ``flops_per_token`` is the
training FLOPs (forward + backward) per token at ``data.seq_length`` in Megatron-LM's
convention (docs/benchmarks.md says what it counts).
"""

import json
import sys

from ling_pretrain.config import compose_or_exit
from ling_pretrain.models.registry import get_family


def main(argv: list[str]) -> None:
    cfg = compose_or_exit(argv)
    family = get_family(cfg.model)
    counts = family.count_parameters(cfg.model).as_dict()
    seq = cfg.data.seq_length
    flops = family.flops_per_token(cfg.model, seq)
    print(
        json.dumps(
            {"model": cfg.model.name, **counts, "seq_length": seq, "flops_per_token": flops},
            indent=2,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
