"""Dense Qwen3 (HF ``model_type: qwen3``): the second dense baseline family."""

from ling_pretrain.models.qwen3.family import Qwen3Family

FAMILY = Qwen3Family()
