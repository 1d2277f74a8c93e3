"""Checkpoints: megatron distributed checkpoints and Hugging Face conversion."""
