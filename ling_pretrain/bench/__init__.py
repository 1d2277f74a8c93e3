"""Experiments that run whole training jobs and compare them: FP8 against BF16
(:mod:`.precision`)."""
