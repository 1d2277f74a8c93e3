"""Train a Ling 2.0 model.

    torchrun --nproc-per-node 2 launch/pretrain.py +model=ling_tiny
    python launch/pretrain.py +model=ling_tiny trainer.max_steps=20        # one process
    torchrun --nproc-per-node 8 launch/pretrain.py +model=ling_mini \\
        parallel.expert_model_parallel_size=8 data=indexed data.prefixes=[/data/corpus] ...

Any field of the config can be overridden (see docs/configuration.md). Exit codes: 0 when
trainer.max_steps is reached, 75 after a stop on SIGTERM/SIGUSR1/SIGUSR2 or a deadline with a
complete checkpoint (run again to resume), 1 on errors (docs/slurm.md).
"""

import hydra
from omegaconf import DictConfig

from ling_pretrain.config.store import register_schemas
from ling_pretrain.config.validate import ConfigError
from ling_pretrain.core.log import setup_logging
from ling_pretrain.train import preempt

# Now, not after the slow imports: a stop signal during start-up is kept instead of fatal.
preempt.install_signal_handlers()
register_schemas()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.logging.level)
    from ling_pretrain.train.loop import train

    try:
        train(cfg)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    except preempt.Stopped as stop:
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main()
