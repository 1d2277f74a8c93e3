"""Each cross-field check raises before any process group exists, naming fields and fix."""

from __future__ import annotations

import pytest

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB, memory_breakdown

CPU = Hardware("cpu", 24 * GIB, has_transformer_engine=False)
H100 = Hardware("cuda", 80 * GIB, has_transformer_engine=True, compute_capability=(9, 0))
A100 = Hardware("cuda", 80 * GIB, has_transformer_engine=True, compute_capability=(8, 0))


def _tiny(*overrides: str):
    return compose(["+model=ling_tiny", "data=mock", *overrides])


@pytest.mark.parametrize(
    "overrides,world,pattern",
    [
        (
            ["parallel.tensor_model_parallel_size=3"],
            3,
            r"tensor_model_parallel_size=3 does not divide model.num_attention_heads=4",
        ),
        (
            ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true"],
            4,
            r"does not divide model.num_query_groups=2",
        ),
        (
            ["parallel.expert_model_parallel_size=3"],
            3,
            r"expert_model_parallel_size=3 does not divide model.num_moe_experts=8",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3"],
            3,
            r"num_layers=4 is not divisible by pipeline_model_parallel_size=3",
        ),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=4",
            ],
            2,
            r"virtual_pipeline_model_parallel_size=4 = 8 model chunks",
        ),
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            1,
            r"needs pipeline_model_parallel_size >= 2",
        ),
        (
            ["parallel.tensor_model_parallel_size=2"],
            3,
            r"world size 3 is not a multiple of .* = 2: world size = TP x PP x CP x DP",
        ),
        (["parallel.tensor_model_parallel_size=2"], 2, r"needs parallel.sequence_parallel=true"),
        (
            ["parallel.sequence_parallel=true"],
            1,
            r"sequence_parallel=true needs tensor_model_parallel_size > 1",
        ),
        (
            ["parallel.context_parallel_size=2"],
            2,
            r"context_parallel_size=2 needs TransformerEngine",
        ),
        (["parallel.moe_token_dispatcher_type=flex"], 1, r"flex needs CUDA GPUs with DeepEP"),
        (
            ["parallel.moe_token_dispatcher_type=magic"],
            1,
            r"'magic' is not one of alltoall, allgather, flex",
        ),
        (
            ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"],
            1,
            r"global_batch_size=6 is not a multiple of micro_batch_size x data-parallel size = 4 x 1",
        ),
        (["trainer.params_dtype=fp64"], 1, r"params_dtype='fp64'"),
        (
            ["model.moe_router_topk=3"],
            1,
            r"topk=3 != 2 x moe_router_group_topk=2: megatron-core scores a group",
        ),
        (
            ["model.moe_router_num_groups=3"],
            1,
            r"moe_router_num_groups=3 must divide num_moe_experts=8",
        ),
        (
            ["data.seq_length=4096"],
            1,
            r"seq_length=4096 exceeds model.max_position_embeddings=1024",
        ),
        (
            ["fp8=bf16", "fp8.recipe=blockwise"],
            1,
            r"fp8.recipe=blockwise needs an NVIDIA GPU with TransformerEngine.*fp8.emulate=true",
        ),
        (["fp8.recipe=fp4"], 1, r"fp8.recipe='fp4' is not a recipe; choose one of bf16, blockwise"),
        (["optimizer.min_lr=1.0"], 1, r"min_lr=1.0 exceeds optimizer.lr"),
        (["data.source=indexed"], 1, r"data.source=indexed needs data.prefixes"),
        (
            ["data.source=indexed", "data.prefixes=[/nonexistent/corpus]"],
            1,
            r"'/nonexistent/corpus': no /nonexistent/corpus.bin/.idx and no pretokenize manifest",
        ),
        (
            ["checkpoint.init_from=/a", "checkpoint.load_dir=/b"],
            1,
            r"init_from .* and checkpoint.load_dir .* exclude each other",
        ),
        (["run.device=cuda"], 1, r"run.device=cuda but no CUDA device is visible"),
        (["logging.log_interval=0"], 1, r"logging.log_interval=0 must be >= 1"),
        (["logging.peak_tflops=0"], 1, r"logging.peak_tflops=0.0 must be > 0 .* or null"),
    ],
)
def test_each_error_names_the_fields(overrides, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(_tiny(*overrides), world, CPU)


def test_all_problems_are_reported_together():
    cfg = _tiny("parallel.tensor_model_parallel_size=3", "parallel.expert_model_parallel_size=3")
    with pytest.raises(ConfigError) as info:
        validate(cfg, 9, CPU)
    assert "num_attention_heads" in str(info.value) and "num_moe_experts" in str(info.value)
    assert "problem(s)" in str(info.value)


def test_blockwise_fp8_needs_hopper():
    cfg = compose(["+model=ling_tiny", "data=mock", "fp8.recipe=blockwise"])
    with pytest.raises(ConfigError, match=r"compute capability >= 9.0 \(Hopper\)"):
        validate(cfg, 1, A100)
    validate(cfg, 1, H100)


def test_ling_mini_does_not_fit_on_a_cpu_machine():
    cfg = compose(["+model=ling_mini", "data=mock"])
    with pytest.raises(
        ConfigError, match=r"ling_mini needs at least .* GiB per process .* 24.0 GiB"
    ):
        validate(cfg, 1, CPU)


def test_ling_mini_fits_on_eight_h100_with_ep8_but_not_on_one():
    ok = compose(
        [
            "+model=ling_mini",
            "data=mock",
            "parallel.expert_model_parallel_size=8",
            "trainer.params_dtype=bf16",
            "trainer.micro_batch_size=1",
        ]
    )
    validate(ok, 8, H100)
    one = compose(
        ["+model=ling_mini", "data=mock", "trainer.params_dtype=bf16", "trainer.micro_batch_size=1"]
    )
    with pytest.raises(ConfigError, match="needs at least"):
        validate(one, 1, H100)


def test_memory_fit_uses_the_memory_model_which_matches_hand_computation():
    """ling_mini, bf16, EP8 DP8 with the distributed optimizer on 8 ranks: the figure the
    fit check compares with the device memory."""
    cfg = compose(
        [
            "+model=ling_mini",
            "data=mock",
            "parallel.expert_model_parallel_size=8",
            "trainer.params_dtype=bf16",
            "trainer.micro_batch_size=1",
        ]
    )
    from ling_pretrain.models.ling.params import count_parameters

    c = count_parameters(cfg.model)
    experts = c.expert_params + c.mtp_expert_params
    dense = c.total_params + c.mtp_params - experts
    # bf16 weight (2) + fp32 grad (4), plus fp32 master + 2 moments (12) sharded over DP.
    expected = dense * (6 + 12 / 8) + experts / 8 * (6 + 12 / 1)
    total = memory_breakdown(cfg, 8).total
    assert total == pytest.approx(expected, rel=1e-6)
    just_too_small = Hardware("cuda", int(total) - 1, True, (9, 0))
    with pytest.raises(ConfigError, match=f"needs at least {total / GIB:.1f} GiB per process"):
        validate(cfg, 8, just_too_small)
    validate(cfg, 8, Hardware("cuda", int(total) + 1, True, (9, 0)))


def test_fp8_emulation_needs_a_recipe_and_sane_bf16_layer_counts():
    with pytest.raises(ConfigError, match="no FP8 GEMMs to emulate"):
        validate(_tiny("fp8.emulate=true"), 1, CPU)
    cfg = _tiny(
        "fp8=blockwise",
        "fp8.emulate=true",
        "fp8.first_last_layers_bf16=true",
        "fp8.num_layers_at_start_in_bf16=3",
        "fp8.num_layers_at_end_in_bf16=2",
    )
    with pytest.raises(ConfigError, match="exceeds model.num_layers=4"):
        validate(cfg, 1, CPU)
    validate(_tiny("fp8=blockwise", "fp8.emulate=true"), 1, CPU)
