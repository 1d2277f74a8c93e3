"""Print a model configuration's parameter counts as JSON.

    python launch/model_info.py +model=ling_mini
    python launch/model_info.py +model=llama31_8b
    python launch/model_info.py +model=ling_tiny model.num_layers=8

``total_params`` and ``active_params`` exclude the MTP layers, as the published figures do;
``mtp_params`` / ``mtp_active_params`` report them separately.
"""

import json
import sys

from ling_pretrain.config import compose_or_exit
from ling_pretrain.models.registry import get_family


def main(argv: list[str]) -> None:
    cfg = compose_or_exit(argv)
    counts = get_family(cfg.model).count_parameters(cfg.model).as_dict()
    print(json.dumps({"model": cfg.model.name, **counts}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
