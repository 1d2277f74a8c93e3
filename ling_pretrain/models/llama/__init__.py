"""Llama 3.x (HF ``model_type: llama``): the dense baseline family."""

from ling_pretrain.models.llama.family import LlamaFamily

FAMILY = LlamaFamily()
