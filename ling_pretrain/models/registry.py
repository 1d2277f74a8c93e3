"""Find model families: every package under ``ling_pretrain/models/`` that defines ``FAMILY``.

Adding a family is adding its folder; nothing here names one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from ling_pretrain.core.errors import ConfigError
from ling_pretrain.models.family import ModelFamily


@functools.cache
def families() -> dict[str, ModelFamily]:
    """Every model family by name."""
    import ling_pretrain.models as package

    found: dict[str, ModelFamily] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, ModelFamily):
            found[family.name] = family
    return found


def get_family(model: Any) -> ModelFamily:
    """The family of a model config (its ``family`` field) or of a family name.

    Raises:
        ConfigError: naming the known families.
    """
    name = model if isinstance(model, str) else getattr(model, "family", None)
    try:
        return families()[name]
    except KeyError:
        raise ConfigError(
            f"model.family={name!r} is not a model family; known: {', '.join(sorted(families()))} "
            "(choose a preset with +model=<name>, see conf/model/)."
        ) from None


def family_for_hf_config(hf_config: dict, source: str = "config.json") -> ModelFamily:
    """The family whose checkpoints have ``hf_config``'s ``model_type``.

    Raises:
        ConfigError: no family reads that model type (the known ones are listed).
    """
    model_type = hf_config.get("model_type")
    for family in families().values():
        if model_type in family.hf.model_types:
            return family
    known = ", ".join(f"{t} ({f.name})" for f in families().values() for t in f.hf.model_types)
    raise ConfigError(
        f"{source} has model_type={model_type!r}, which no model family here reads; known model "
        f"types: {known}."
    )
