"""FP8 options of the TransformerEngine path, checked on a faked Hopper machine.

On-demand transpose runs on TE only for 128x128 block-scaled FP8 primary weights (released TE
rebuilds their column-wise copy from the row-wise one); any other combination is refused
with the fix. Routing-map padding under the per-tensor ``tensorwise`` recipe warns, because
the padded tokens enter the expert inputs' FP8 scales.
"""

from __future__ import annotations

import logging

import pytest

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB, memory_breakdown


def _h100(te_version: str | None = "2.20.2") -> Hardware:
    return Hardware("cuda", 80 * GIB, True, (9, 0), te_version)


def _tiny(*overrides: str):
    return compose(["+model=ling_tiny", "data=mock", *overrides])


def test_blockwise_fp8_params_with_on_demand_transpose_validates_on_released_te():
    cfg = _tiny("fp8=blockwise_fp8_params")
    assert cfg.fp8.on_demand_transpose and cfg.fp8.fp8_param_gather
    validate(cfg, 1, _h100("2.20.2"))
    validate(cfg, 1, _h100("2.4.0"))
    validate(cfg, 1, _h100(None))  # version unknown: TE importable is all that is known


@pytest.mark.parametrize(
    "overrides,te_version,pattern",
    [
        (
            ["fp8=blockwise_fp8_params"],
            "2.3.0",
            r"needs TransformerEngine >= 2\.4 .* this machine has 2\.3\.0\. Upgrade "
            r"TransformerEngine or set fp8\.on_demand_transpose=false",
        ),
        (
            ["fp8=blockwise", "fp8.on_demand_transpose=true"],
            "2.20.2",
            r"needs FP8 primary weights .*fp8\.fp8_param_gather=true.* "
            r"set fp8\.on_demand_transpose=false",
        ),
        (
            ["fp8=tensorwise", "fp8.on_demand_transpose=true"],
            "2.20.2",
            r"128x128 blocks .* fp8\.recipe=tensorwise .* Set fp8\.on_demand_transpose=false",
        ),
        (
            ["fp8=tensorwise", "fp8.on_demand_transpose=true", "fp8.fp8_param_gather=true"],
            "2.20.2",
            r"128x128 blocks",
        ),
    ],
)
def test_on_demand_transpose_refused_where_te_cannot_do_it(overrides, te_version, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(_tiny(*overrides), 1, _h100(te_version))


def test_emulation_is_not_bound_by_te_limits():
    # The emulation never caches a transposed weight; the TE checks do not apply.
    validate(_tiny("fp8=tensorwise", "fp8.emulate=true", "fp8.on_demand_transpose=true"), 1)


def test_tensorwise_routing_padding_warns_on_te(caplog):
    padded = "fp8.moe_router_padding_for_quantization=true"
    with caplog.at_level(logging.WARNING, logger="ling_pretrain.fp8.checks"):
        validate(_tiny("fp8=tensorwise", padded), 1, _h100())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "fp8.recipe=tensorwise changes the numbers" in warned[0]
    assert "fp8.moe_router_padding_for_quantization=false" in warned[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ling_pretrain.fp8.checks"):
        validate(_tiny("fp8=tensorwise"), 1, _h100())
        validate(_tiny("fp8=blockwise", padded), 1, _h100())
        validate(_tiny("fp8=blockwise_fp8_params"), 1, _h100())
        validate(_tiny("fp8=tensorwise", "fp8.emulate=true", padded), 1)  # flag not passed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_memory_counts_on_demand_transpose_only_where_te_can_do_it():
    overrides = ["+model=ling_mini", "parallel.expert_model_parallel_size=8"]
    overrides.append("trainer.params_dtype=bf16")
    # tensorwise asks for it but released TE keeps the transpose: counted as cached
    tensorwise = compose([*overrides, "fp8=tensorwise", "fp8.on_demand_transpose=true"])
    assert memory_breakdown(tensorwise, 8).states.fp8_transposes > 0
    # asked explicitly (Ling's TE patch), the saving is counted
    explicit = memory_breakdown(tensorwise, 8, on_demand_transpose=True).states
    assert explicit.fp8_transposes == 0
    # blockwise without FP8 primary weights: cached; with them: dropped
    no_fp8_weights = compose([*overrides, "fp8=blockwise", "fp8.on_demand_transpose=true"])
    assert memory_breakdown(no_fp8_weights, 8).states.fp8_transposes > 0
    fp8_params = compose([*overrides, "fp8=blockwise_fp8_params"])
    assert memory_breakdown(fp8_params, 8).states.fp8_transposes == 0
    no_odt = compose([*overrides, "fp8=blockwise_fp8_params", "fp8.on_demand_transpose=false"])
    assert memory_breakdown(no_odt, 8).states.fp8_transposes > 0
