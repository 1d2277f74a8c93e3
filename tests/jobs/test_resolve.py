"""Which model a checkpoint holds: config.json or config.yaml decides, +model= overrides, and
nothing falls back silently."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.resolve import resolve_checkpoint
from ling_pretrain.models.registry import get_family
from tests.models.hf_dense import PUBLISHED

TINY = ["+model=ling_tiny", "data=mock"]


def _hf_dir(path, **extra):
    """An HF directory of ling_tiny: config.json (with ``extra`` keys) and a weights file."""
    path.mkdir(parents=True)
    config = get_family("ling").hf.config_json(compose(TINY).model)
    config.pop("torch_dtype")
    config.update(extra)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")  # resolution only checks that weights exist
    return path


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({"dtype": "float32"}, "fp32"),  # transformers >= 4.56
        ({"torch_dtype": "float32"}, "fp32"),  # older transformers, Ling's published configs
        ({"dtype": "float32", "torch_dtype": "bfloat16"}, "fp32"),
        ({"torch_dtype": "bfloat16"}, "bf16"),
        ({}, "bf16"),
    ],
)
def test_hf_dtype_is_read_from_either_spelling(tmp_path, keys, expected):
    resolved = resolve_checkpoint(_hf_dir(tmp_path / "hf", **keys), [], ["data=mock"])
    assert resolved.kind == "hf" and resolved.family.name == "ling"
    assert resolved.cfg.trainer.params_dtype == expected
    assert resolved.cfg.model.num_layers == 4 and resolved.cfg.model.vocab_size == 8192


def test_hf_config_decides_the_family_and_every_model_field(tmp_path):
    hf = _hf_dir(tmp_path / "hf", dtype="float32")
    cfg = resolve_checkpoint(hf, [], ["data=mock"]).cfg
    tiny = compose(TINY).model
    for field in ("num_layers", "hidden_size", "num_moe_experts", "rotary_base", "vocab_size"):
        assert cfg.model[field] == tiny[field], field
    assert cfg.model.family == "ling" and cfg.model.name == "hf"


def test_hf_model_type_no_family_reads_is_refused_with_the_known_ones(tmp_path):
    hf = _hf_dir(tmp_path / "hf", model_type="mistral")
    with pytest.raises(
        ConfigError, match=r"model_type='mistral'.*known model types: bailing_moe_v2"
    ) as err:
        resolve_checkpoint(hf, [], ["data=mock"])
    assert "llama (llama)" in str(err.value) and "qwen3 (qwen3)" in str(err.value)


def test_hf_config_checked_against_an_explicit_preset(tmp_path):
    hf = _hf_dir(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"model.num_layers=20"):
        resolve_checkpoint(hf, ["+model=ling_mini"], ["data=mock"])


def _megatron_ckpt(root):
    ckpt = root / "checkpoints" / "iter_0000003"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    (ckpt / "train_state.json").write_text(json.dumps({"step": 3}))
    (root / "checkpoints" / "latest").write_text("iter_0000003")
    return root / "checkpoints"


def test_megatron_checkpoint_without_config_yaml_asks_for_the_model(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot tell which model .* add \+model=<preset>"):
        resolve_checkpoint(_megatron_ckpt(tmp_path), [], ["data=mock"])


def test_megatron_checkpoint_takes_the_model_and_dtype_of_its_run(tmp_path):
    save_dir = _megatron_ckpt(tmp_path)
    run = compose([*TINY, "model.num_layers=2", "trainer.params_dtype=bf16"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(run, resolve=True))
    resolved = resolve_checkpoint(save_dir, [], ["data=mock"])
    assert resolved.kind == "megatron" and resolved.path.name == "iter_0000003"
    assert resolved.cfg.model.num_layers == 2 and resolved.cfg.model.name == "ling_tiny"
    assert resolved.cfg.trainer.params_dtype == "bf16"
    explicit = resolve_checkpoint(save_dir, [*TINY, "trainer.params_dtype=fp32"], ["data=mock"])
    assert explicit.cfg.model.num_layers == 4 and explicit.cfg.trainer.params_dtype == "fp32"


@pytest.mark.parametrize("preset", ["llama31_8b", "qwen3_8b"])
def test_published_dense_config_json_resolves_to_its_preset(tmp_path, preset):
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(PUBLISHED[preset][0]))
    (path / "model.safetensors").write_bytes(b"")
    resolved = resolve_checkpoint(path, [], ["data=mock"])
    assert resolved.family.name == compose([f"+model={preset}"]).model.family
    assert resolved.cfg.trainer.params_dtype == "bf16"
    ours = dict(resolved.cfg.model, name=preset)
    assert ours == dict(compose([f"+model={preset}"]).model)
