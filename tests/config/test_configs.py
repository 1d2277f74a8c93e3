"""Every shipped YAML composes against its schema and validates for a layout it is meant for."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ling_pretrain.config import CONF_DIR, compose
from ling_pretrain.config.schema import GROUPS
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB
from ling_pretrain.models.ling.params import count_parameters

H100 = Hardware("cuda", 80 * GIB, has_transformer_engine=True, compute_capability=(9, 0))
CPU = Hardware("cpu", 24 * GIB, has_transformer_engine=False)

# Preset -> (world size, overrides, hardware) of a layout it is meant to run with.
MODEL_LAYOUTS = {
    "ling_tiny": (2, ["data=mock"], CPU),
    "ling_mini": (
        8,
        [
            "parallel.expert_model_parallel_size=8",
            "trainer.params_dtype=bf16",
            "trainer.micro_batch_size=1",
        ],
        H100,
    ),
    "ling_flash": (
        64,
        [
            "parallel.expert_model_parallel_size=64",
            "parallel.pipeline_model_parallel_size=1",
            "trainer.params_dtype=bf16",
            "trainer.global_batch_size=64",
            "trainer.micro_batch_size=1",
        ],
        H100,
    ),
    "ling_1t": (
        512,
        [
            "parallel.expert_model_parallel_size=64",
            "parallel.pipeline_model_parallel_size=8",
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
            "trainer.params_dtype=bf16",
            "trainer.global_batch_size=512",
            "trainer.micro_batch_size=1",
        ],
        H100,
    ),
    "llama_tiny": (2, ["data=mock", "parallel.tensor_model_parallel_size=2"], CPU),
    "qwen3_tiny": (2, ["data=mock"], CPU),
    "llama31_8b": (8, ["trainer.params_dtype=bf16", "trainer.micro_batch_size=1"], H100),
    "qwen3_8b": (8, ["trainer.params_dtype=bf16", "trainer.micro_batch_size=1"], H100),
}


B200 = Hardware("cuda", 180 * GIB, has_transformer_engine=True, compute_capability=(10, 0))
# Presets meant for GPUs validate against the hardware they target.
TARGET_HARDWARE = {
    ("fp8", "blockwise"): H100,
    ("fp8", "blockwise_fp8_params"): H100,
    ("fp8", "tensorwise"): H100,
    ("fp8", "mxfp8"): B200,
}


def _yaml_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_a_schema_and_a_directory():
    for group in GROUPS:
        assert (CONF_DIR / group).is_dir(), group
        assert _yaml_names(group), f"conf/{group}/ ships no YAML"


@pytest.mark.parametrize("name", _yaml_names("model"))
def test_model_presets_compose_and_validate(name):
    world, overrides, hw = MODEL_LAYOUTS[name]
    cfg = compose([f"+model={name}", *overrides])
    assert cfg.model.name == name
    layout = validate(cfg, world, hw)
    assert layout.world_size == world


@pytest.mark.parametrize(
    "group,name",
    [(g, n) for g in GROUPS if g != "model" for n in _yaml_names(g)],
)
def test_group_yamls_compose_and_validate(group, name, tmp_path):
    overrides = ["+model=ling_tiny", f"{group}={name}"]
    if group == "data" and name == "indexed":
        prefix = _tiny_indexed_dataset(tmp_path)
        overrides += [f"data.prefixes=[{prefix}]", "data.eod_token_id=0", "data.seq_length=128"]
    cfg = compose(overrides)
    validate(cfg, 1, TARGET_HARDWARE.get((group, name), CPU))


def _tiny_indexed_dataset(tmp_path) -> str:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "tiny")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(torch.tensor([5, 6, 7, 0], dtype=torch.int32), [4])
    builder.finalize(prefix + ".idx")
    return prefix


def test_a_typo_fails_at_compose_time_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="hiden_size") as info:
        compose(["+model=ling_tiny", "model.hiden_size=3"])
    assert "hiden_size" in str(info.value.__cause__)


def test_a_forced_typo_is_refused_by_validation_with_a_suggestion():
    """Hydra's ``+key=`` adds keys even to typed nodes; validation catches them."""
    cfg = compose(["+model=ling_tiny", "data=mock", "+model.hiden_size=3", "+trainer.max_step=3"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, 1, CPU)
    assert "model.hiden_size is not a configuration field (did you mean model.hidden_size?)" in str(
        info.value
    )
    assert "trainer.max_step is not a configuration field (did you mean trainer.max_steps?)" in str(
        info.value
    )


def test_a_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="num_layers=many") as info:
        compose(["+model=ling_tiny", "model.num_layers=many"])
    assert "could not be converted to Integer" in str(info.value.__cause__)


def test_model_is_required():
    cfg = compose([])
    assert OmegaConf.is_missing(cfg, "model")


def test_presets_carry_the_published_architecture():
    mini = compose(["+model=ling_mini"]).model
    assert (mini.num_layers, mini.hidden_size, mini.num_moe_experts) == (20, 2048, 256)
    assert (mini.moe_router_topk, mini.moe_router_num_groups, mini.moe_router_group_topk) == (
        8,
        8,
        4,
    )
    assert mini.vocab_size == 157184 and mini.rotary_percent == 0.5
    assert mini.moe_router_topk_scaling_factor == 2.5 and mini.mtp_num_layers == 1
    one_t = compose(["+model=ling_1t"]).model
    assert (one_t.num_layers, one_t.hidden_size, one_t.first_k_dense_replace) == (80, 8192, 4)


@pytest.mark.parametrize(
    "name,total,active,rel",
    [
        ("ling_mini", 16.26e9, 1.43e9, 0.005),
        ("ling_flash", 103e9, 6.1e9, 0.02),
        ("ling_1t", 1000e9, 51e9, 0.02),
    ],
)
def test_parameter_counts_match_published_figures(name, total, active, rel):
    counts = count_parameters(compose([f"+model={name}"]).model)
    assert counts.total_params == pytest.approx(total, rel=rel)
    assert counts.active_params == pytest.approx(active, rel=rel)
    assert counts.mtp_params > 0


def test_mini_parameter_breakdown_matches_the_derivation():
    """ling2.md: embedding + lm_head 643.8M, 789M activated non-embedding."""
    counts = count_parameters(compose(["+model=ling_mini"]).model)
    assert counts.embedding_params == 2 * 157184 * 2048
    assert (counts.active_params - counts.embedding_params) / 1e6 == pytest.approx(789, abs=1)


def test_tiny_is_a_few_million_parameters_with_every_feature_on():
    m = compose(["+model=ling_tiny"]).model
    counts = count_parameters(m)
    assert 1e6 < counts.total_params < 10e6
    assert m.mtp_num_layers >= 1 and m.first_k_dense_replace >= 1
    assert m.moe_router_enable_expert_bias and m.moe_shared_expert_intermediate_size > 0
    assert m.moe_router_topk == 2 * m.moe_router_group_topk
    assert m.moe_z_loss_coeff > 0 and m.rotary_percent < 1
