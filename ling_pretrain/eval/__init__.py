"""Evaluation of a checkpoint: losses, perplexity and logits (see :mod:`.evaluate`)."""
