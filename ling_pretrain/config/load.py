"""Compose a job config from ``conf/`` outside ``@hydra.main`` (tests, tools, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from ling_pretrain.config.store import register_schemas

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
"""The shipped Hydra configuration directory."""


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra command-line style overrides.

    Args:
        overrides: e.g. ``["+model=ling_tiny", "trainer.max_steps=5"]``.
        config_name: top-level config file name without ``.yaml``.

    Returns:
        The composed config, typed by :class:`~ling_pretrain.config.schema.JobConfig`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
