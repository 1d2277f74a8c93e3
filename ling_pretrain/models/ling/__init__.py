"""Ling 2.0 (BailingMoeV2) on megatron-core."""
