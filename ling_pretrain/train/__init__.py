"""The trainer: setup, step, loop and metrics (separate from the model)."""
