"""Configuration: schemas, composition and validation."""

from ling_pretrain.config.load import CONF_DIR, compose
from ling_pretrain.config.schema import JobConfig

__all__ = ["CONF_DIR", "JobConfig", "compose"]
