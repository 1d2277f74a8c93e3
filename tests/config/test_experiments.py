"""The recipes in conf/experiment/ reproduce Ling's continued-pretraining scripts and validate
for the GPUs they are meant for (hardware faked: Hopper GPUs with TransformerEngine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ling_pretrain.config import compose
from ling_pretrain.config.checks import presets
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB
from ling_pretrain.models.registry import get_family

H100 = Hardware("cuda", 80 * GIB, True, (9, 0), "2.6.0")
GPUS = {"ling_mini_cpt_4k": 8, "ling_mini_cpt_8k": 8, "ling_mini_cpt_32k": 32}
LING_EOS = 156892


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "tok")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for i in range(200):
        doc = torch.full((64,), 1000 + i, dtype=torch.int32)
        doc[-1] = LING_EOS
        builder.add_document(doc, [64])
    builder.finalize(prefix + ".idx")
    return prefix


def _hf_dir(path, model_cfg):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(get_family(model_cfg).hf.config_json(model_cfg)))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_every_experiment_is_listed():
    assert presets("experiment") == sorted(GPUS)


@pytest.mark.parametrize("name", sorted(GPUS))
def test_experiment_validates_for_its_gpus_from_an_hf_checkpoint(name, corpus, tmp_path):
    base = compose([f"+experiment={name}"])
    hf = _hf_dir(tmp_path / "hf", base.model)  # a checkpoint of the model the recipe expects
    cfg = compose(
        [
            f"+experiment={name}",
            f"data.prefixes=[{corpus}]",
            f"data.eod_token_id={LING_EOS}",
            f"checkpoint.init_from_hf={hf}",
            f"run.output_dir={tmp_path / 'run'}",
        ]
    )
    layout = validate(cfg, GPUS[name], H100)
    assert layout.dp * layout.tp * layout.pp == GPUS[name]
    assert cfg.optimizer.optimizer == "adam8bit" and cfg.fp8.recipe == "blockwise"
    assert cfg.fp8.fp8_param_gather and cfg.trainer.params_dtype == "bf16"
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.lr_warmup_steps) == (
        3e-5,
        3e-6,
        0,
    )
    assert cfg.trainer.global_batch_size == 128 and cfg.trainer.max_steps == 2000
    assert cfg.data.eod_mask_loss and cfg.model.mtp_num_layers == 1


def test_experiments_carry_ling_s_per_script_differences():
    four, eight, long = (compose([f"+experiment=ling_mini_cpt_{s}"]) for s in ("4k", "8k", "32k"))
    assert (four.data.seq_length, eight.data.seq_length, long.data.seq_length) == (
        4096,
        8192,
        32768,
    )
    assert four.trainer.recompute_granularity == "selective" and list(
        four.trainer.recompute_modules
    ) == ["moe"]
    assert eight.trainer.recompute_granularity == "full"
    assert (
        eight.fp8.moe_router_padding_for_quantization
        and not four.fp8.moe_router_padding_for_quantization
    )
    p = long.parallel
    assert (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.expert_model_parallel_size,
    ) == (2, 4, 4)
    assert p.sequence_parallel
    assert (four.model.rotary_base, long.model.rotary_base) == (10000, 600000)


def test_an_experiment_on_too_few_gpus_is_refused(corpus, tmp_path):
    cfg = compose(
        [
            "+experiment=ling_mini_cpt_32k",
            f"data.prefixes=[{corpus}]",
            f"data.eod_token_id={LING_EOS}",
        ]
    )
    with pytest.raises(ValueError, match="world size 8 is not a multiple of"):
        validate(cfg, 8, H100)
