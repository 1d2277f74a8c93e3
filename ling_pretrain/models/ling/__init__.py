"""Ling 2.0 (BailingMoeV2): the model family, its HF checkpoints, counts and rules."""

from ling_pretrain.models.ling.family import LingFamily

FAMILY = LingFamily()
