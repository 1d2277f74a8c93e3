"""Leaf modules every package may import: errors, the derived layout, the FP8 recipe registry,
atomic writes and logging set-up. Nothing here imports another ``ling_pretrain`` package."""
