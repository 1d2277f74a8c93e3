"""Compose a job config from ``conf/`` outside ``@hydra.main`` (tests, tools, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from ling_pretrain.config.checks import CONF_DIR, check_overrides, presets
from ling_pretrain.config.store import register_schemas
from ling_pretrain.core.errors import ConfigError


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


def has_model_override(overrides: Sequence[str]) -> bool:
    """Whether the overrides choose a model preset (``+model=...`` or ``model=...``), or an
    experiment (``+experiment=...``), which always names its model."""
    return any(
        o.startswith(("+model=", "model=", "+experiment=", "experiment=")) for o in overrides
    )


NO_MODEL = (
    "no model chosen: add +model=<preset> to the command (presets: "
    f"{', '.join(presets('model'))}), e.g. +model=ling_tiny for a run on CPU."
)


def compose_job(overrides: Sequence[str] = ()) -> DictConfig:
    """:func:`compose` for a job, with user mistakes turned into a :class:`ConfigError`.

    Raises:
        ConfigError: no model preset chosen, or an override Hydra cannot apply.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    problems = check_overrides(list(overrides))
    if not has_model_override(overrides):
        problems.insert(0, NO_MODEL)
    if problems:
        raise ConfigError("\n".join(problems) if len(problems) > 1 else problems[0])
    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose the config: {err}") from None


def compose_or_exit(overrides: Sequence[str] = ()) -> DictConfig:
    """:func:`compose_job` for command-line tools: a mistake ends the process with its message."""
    try:
        return compose_job(overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
