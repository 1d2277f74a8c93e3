"""FP8 continued pretraining of Ling 2.0 mixture-of-experts models on megatron-core."""

from ling_pretrain.core.log import ignore_upstream_warnings

# Every command imports megatron-core, which warns at import about optional GPU kernels that
# are absent on CPU; those warnings name nothing a user can act on.
ignore_upstream_warnings()
