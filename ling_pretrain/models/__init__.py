"""Model definitions: architecture only (parallelism, FP8 and checkpoints live beside them)."""
