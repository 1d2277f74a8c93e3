"""Configuration: schemas, composition and validation."""

from ling_pretrain.config.load import (
    CONF_DIR,
    compose,
    compose_job,
    compose_or_exit,
    has_model_override,
)
from ling_pretrain.config.schema import JobConfig

__all__ = [
    "CONF_DIR",
    "JobConfig",
    "compose",
    "compose_job",
    "compose_or_exit",
    "has_model_override",
]
