"""Training data: indexed datasets, blends and the built-in corpus."""
