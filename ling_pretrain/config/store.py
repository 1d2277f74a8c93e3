"""Register the structured-config schemas in Hydra's ConfigStore.

``conf/config.yaml`` starts from ``job_schema`` and every group YAML starts from
``<group>_schema``, so Hydra type-checks each preset against its dataclass when it composes.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from ling_pretrain.config.schema import GROUPS, JobConfig

_registered = False


def register_schemas() -> None:
    """Register ``job_schema`` and one ``<group>_schema`` per config group (idempotent)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    store.store(name="job_schema", node=JobConfig)
    for group, schema in GROUPS.items():
        store.store(group=group, name=f"{group}_schema", node=schema)
    _registered = True
