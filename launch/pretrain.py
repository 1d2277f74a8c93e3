"""Train a Ling 2.0 model.

    torchrun --nproc-per-node 2 launch/pretrain.py +model=ling_tiny
    python launch/pretrain.py +model=ling_tiny trainer.max_steps=20        # one process
    torchrun --nproc-per-node 8 launch/pretrain.py +model=ling_mini \\
        parallel.expert_model_parallel_size=8 data=indexed data.prefixes=[/data/corpus] ...

Any field of the config can be overridden (see docs/configuration.md).
"""

import hydra
from omegaconf import DictConfig

from ling_pretrain.config.store import register_schemas
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.log import setup_logging
from ling_pretrain.train.loop import train

register_schemas()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.logging.level)
    try:
        train(cfg)
    except ConfigError as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
