"""Train a model (Ling 2.0 by default).

    python launch/pretrain.py +model=ling_tiny trainer.max_steps=20        # one process
    python launch/pretrain.py --nproc-per-node 2 +model=ling_tiny          # two, validated first
    torchrun --nproc-per-node 2 launch/pretrain.py +model=ling_tiny
    torchrun --nproc-per-node 8 launch/pretrain.py +model=ling_mini \\
        parallel.expert_model_parallel_size=8 data=indexed data.prefixes=[/data/corpus] ...

Any field of the config can be overridden (see docs/configuration.md). Exit codes: 0 when
trainer.max_steps is reached, 75 after a stop on SIGTERM/SIGUSR1/SIGUSR2 or a deadline with a
complete checkpoint (run again to resume), 3 after trainer.max_consecutive_bad_steps bad steps
in a row, 1 on errors (docs/slurm.md).
"""

import sys

import hydra
from omegaconf import DictConfig

from ling_pretrain.config.store import register_schemas
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.core.log import setup_logging
from ling_pretrain.train import bad_steps, preempt
from ling_pretrain.train.cli import exit_with_config_error, run_command_line

register_schemas()


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.logging.level)
    # Imported here, not above: processes started with spawn (data workers) import this
    # script again and need none of megatron-core.
    from ling_pretrain.train.loop import train

    try:
        train(cfg)
    except ConfigError as err:
        exit_with_config_error(err)
    except preempt.Stopped as stop:
        raise SystemExit(stop.exit_code) from None
    except bad_steps.TooManyBadSteps as err:  # rank 0 has logged why
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    # Before the slow imports: a stop signal during start-up is kept instead of fatal.
    preempt.install_signal_handlers()
    run_command_line(sys.argv[1:], __file__, main)
