"""HF -> megatron -> HF in one process: bit-exact for every tensor, fp32 and bf16, expert bias
fp32 throughout; missing/unexpected keys named; FP8 export format and error bounds; shards
and template files."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from ling_pretrain.checkpoint.hf.adapter import INDEX_FILE
from ling_pretrain.checkpoint.hf.exporter import export_hf
from ling_pretrain.checkpoint.hf.loader import load_hf_into_model
from ling_pretrain.models.registry import get_family
from tests.checkpoint.conftest import (
    assert_same_tensors,
    randomize,
    read_all,
    tiny_cfg,
    world_of_one,
)

LING = get_family("ling").hf


@pytest.fixture(scope="module")
def world():
    with world_of_one():
        yield


def _build(params_dtype: str, seed: int):
    from ling_pretrain.models.build import build_model

    cfg = tiny_cfg(params_dtype)
    chunks = build_model(cfg)
    randomize(chunks, seed)  # different from the checkpoint's values
    return cfg, chunks


@pytest.mark.parametrize("params_dtype", ["fp32", "bf16"])
def test_round_trip_bit_exact(world, hf_tiny, tmp_path, params_dtype):
    source = read_all(hf_tiny)
    export = "fp32" if params_dtype == "fp32" else "bf16"
    if params_dtype == "bf16":  # a bf16 HF checkpoint (expert bias stays fp32)
        cfg, chunks = _build("fp32", 1)
        load_hf_into_model(hf_tiny, chunks, cfg, LING)
        export_hf(chunks, cfg, LING, tmp_path / "start", dtype="bf16")
        start = tmp_path / "start"
    else:
        start = hf_tiny
    cfg, chunks = _build(params_dtype, 2)
    load_hf_into_model(start, chunks, cfg, LING)
    export_hf(chunks, cfg, LING, tmp_path / "back", dtype=export)
    before, after = read_all(start), read_all(tmp_path / "back")
    assert_same_tensors(before, after)

    biases = [k for k in after if k.endswith("mlp.gate.expert_bias")]
    assert len(biases) == 4  # 3 MoE decoder layers + MTP
    for k in biases:
        assert after[k].dtype == torch.float32
        assert torch.equal(after[k], source[k])  # never rounded through bf16
        assert not torch.equal(source[k].bfloat16().float(), source[k])  # it would show
    mtp = [k for k in after if k.startswith("model.layers.4.")]
    assert "model.layers.4.eh_proj.weight" in mtp and len(mtp) == 4 + 35
    weights = [k for k in after if not k.endswith("expert_bias")]
    want = torch.float32 if params_dtype == "fp32" else torch.bfloat16
    assert all(after[k].dtype == want for k in weights)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["torch_dtype"] == ("float32" if params_dtype == "fp32" else "bfloat16")


def test_loaded_parameters_equal_the_source_model(world, hf_tiny):
    """The loader fills every parameter (not only the ones the exporter reads back)."""
    from ling_pretrain.models.build import build_model

    cfg = tiny_cfg("fp32")
    original = build_model(cfg)
    randomize(original)  # the values hf_tiny was exported from
    loaded = build_model(cfg)
    randomize(loaded, 5)
    load_hf_into_model(hf_tiny, loaded, cfg, LING)
    a, b = original[0].state_dict(), loaded[0].state_dict()
    names = [k for k in a if a[k] is not None and not k.endswith("_extra_state")]
    assert len(names) == 119
    assert all(torch.equal(a[k], b[k]) for k in names)


def _rewrite(src, dst, drop=(), add=None):
    shutil.copytree(src, dst)
    tensors = read_all(src)
    for k in drop:
        tensors.pop(k)
    tensors.update(add or {})
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / INDEX_FILE).unlink()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_keys_named(world, hf_tiny, tmp_path):
    cfg, chunks = _build("fp32", 3)
    _rewrite(hf_tiny, tmp_path / "missing", drop=["model.layers.4.mlp.gate.expert_bias"])
    with pytest.raises(KeyError, match=r"missing \['model.layers.4.mlp.gate.expert_bias'\]"):
        load_hf_into_model(tmp_path / "missing", chunks, cfg, LING)
    extra = {"model.layers.9.mlp.gate.weight": torch.zeros(8, 128)}
    _rewrite(hf_tiny, tmp_path / "extra", add=extra)
    with pytest.raises(KeyError, match=r"unexpected \['model.layers.9.mlp.gate.weight'\]"):
        load_hf_into_model(tmp_path / "extra", chunks, cfg, LING)


def test_wrong_shape_named(world, hf_tiny, tmp_path):
    cfg, chunks = _build("fp32", 3)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(hf_tiny, tmp_path / "shape", drop=[key], add={key: torch.zeros(32, 128)})
    with pytest.raises(ValueError, match=r"experts.local_experts.5.linear_fc1.weight: HF"):
        load_hf_into_model(tmp_path / "shape", chunks, cfg, LING)


FP8_HIGH_PRECISION = ("norm.weight", "layernorm.weight", "mlp.gate.weight", "expert_bias")


def test_fp8_export(world, hf_tiny, tmp_path):
    from ling_pretrain.fp8.quantize import dequantize_blockwise, quantization_error_bound

    cfg, chunks = _build("fp32", 4)
    load_hf_into_model(hf_tiny, chunks, cfg, LING)
    fc1 = chunks[0].decoder.layers[0].mlp.linear_fc1.weight  # [gate 256; up 256] x 128
    with torch.no_grad():
        fc1[:128] = 0.0  # one 128x128 block of gate_proj all zeros
        fc1[128:256] *= 3e4  # one block of large values (still inside fp32 range)
    reference = read_all(hf_tiny)
    reference["model.layers.0.mlp.gate_proj.weight"] = fc1[:256].detach().clone()
    export_hf(chunks, cfg, LING, tmp_path / "fp8", dtype="fp8")
    out = read_all(tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
        "modules_to_not_convert": ["lm_head", "model.layers.4.eh_proj"],
    }

    quantized = sorted(k for k in out if out[k].dtype == torch.float8_e4m3fn)
    scales = {k[: -len("_scale_inv")] for k in out if k.endswith("_scale_inv")}
    assert set(quantized) == scales
    high = set(reference) - set(quantized)
    assert "model.layers.4.mlp.experts.3.gate_proj.weight" in quantized  # MTP's layer too
    assert "model.layers.4.attention.query_key_value.weight" in quantized
    for key in high:  # exactly: norms, router, bias, embeddings, lm_head, eh_proj
        assert key.endswith(FP8_HIGH_PRECISION) or key in (
            "model.word_embeddings.weight",
            "lm_head.weight",
            "model.layers.4.eh_proj.weight",
        ), key
        want = torch.float32 if key.endswith("expert_bias") else torch.bfloat16
        assert out[key].dtype == want, key
    assert len(quantized) == 2 + 3 + 4 * (2 + 3 * 8 + 3)  # dense layer, 4 MoE layers

    for key in quantized:
        w, q, s = reference[key], out[key], out[key + "_scale_inv"]
        rows, cols = w.shape
        assert s.dtype == torch.float32
        assert tuple(s.shape) == (math.ceil(rows / 128), math.ceil(cols / 128)), key
        deq = dequantize_blockwise(q, s, (128, 128))
        bound = quantization_error_bound(w, s, (128, 128))
        assert ((deq.double() - w.double()).abs() <= bound).all(), key
    gate_q = out["model.layers.0.mlp.gate_proj.weight"]
    gate_s = out["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    assert gate_s.shape == (2, 1)
    assert torch.equal(gate_q[:128].float(), torch.zeros(128, 128)) and gate_s[0, 0] == 1.0
    big = reference["model.layers.0.mlp.gate_proj.weight"][128:]
    assert gate_s[1, 0] > 1.0  # a block of values far above 448 gets a scale above one
    deq_big = gate_q[128:].float() * gate_s[1, 0]
    assert (deq_big - big).abs().max() <= big.abs().max() / 16


def test_shards_index_and_template(world, hf_tiny, tmp_path):
    template = tmp_path / "template"
    template.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (template / name).write_text("{}")
    (template / "generation_config.json").write_text('{"eos_token_id": 0}')
    (template / "modeling_bailing_moe_v2.py").write_text("# modeling code\n")
    (template / "config.json").write_text('{"model_type": "other"}')
    (template / "pytorch_model.bin").write_text("not copied")

    cfg, chunks = _build("fp32", 6)
    load_hf_into_model(hf_tiny, chunks, cfg, LING)
    out = tmp_path / "sharded"
    export_hf(chunks, cfg, LING, out, dtype="fp32", template_dir=template, max_shard_bytes=1 << 20)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 5 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(files)
    sizes = sum(t.numel() * t.element_size() for t in read_all(out).values())
    assert index["metadata"]["total_size"] == sizes
    assert_same_tensors(read_all(hf_tiny), read_all(out))
    for name in ("tokenizer.json", "generation_config.json", "modeling_bailing_moe_v2.py"):
        assert (out / name).read_text() == (template / name).read_text()
    assert not (out / "pytorch_model.bin").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "bailing_moe_v2"
    assert not (tmp_path / "sharded.partial").exists()


def test_fp8_checkpoint_loads_as_its_dequantised_values(world, hf_tiny, tmp_path):
    """An FP8 export (or a published FP8 checkpoint) loads: each E4M3 weight becomes
    ``q * weight_scale_inv`` over its 128x128 block, every other tensor loads as stored."""
    from ling_pretrain.fp8.quantize import dequantize_blockwise

    cfg, chunks = _build("fp32", 6)
    load_hf_into_model(hf_tiny, chunks, cfg, LING)
    export_hf(chunks, cfg, LING, tmp_path / "fp8", dtype="fp8")
    stored = read_all(tmp_path / "fp8")
    cfg, loaded = _build("fp32", 7)
    load_hf_into_model(tmp_path / "fp8", loaded, cfg, LING)
    export_hf(loaded, cfg, LING, tmp_path / "back", dtype="fp32")
    back = read_all(tmp_path / "back")

    assert set(back) == {k for k in stored if not k.endswith("_scale_inv")}
    quantized = [k for k in stored if stored[k].dtype == torch.float8_e4m3fn]
    assert len(quantized) == 2 + 3 + 4 * (2 + 3 * 8 + 3)
    for key, value in back.items():
        if key in quantized:
            want = dequantize_blockwise(stored[key], stored[key + "_scale_inv"], (128, 128))
        else:
            want = stored[key].float()
        assert torch.equal(value, want), key
    original = read_all(hf_tiny)
    qkv = "model.layers.1.attention.query_key_value.weight"
    assert not torch.equal(back[qkv], original[qkv])  # really went through E4M3


def test_unsupported_quantization_config_is_refused(world, hf_tiny, tmp_path):
    shutil.copytree(hf_tiny, tmp_path / "int4")
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "int4" / "config.json").write_text(json.dumps(config))
    cfg, chunks = _build("fp32", 8)
    with pytest.raises(ValueError, match="awq.*not a blockwise E4M3 FP8 checkpoint"):
        load_hf_into_model(tmp_path / "int4", chunks, cfg, LING)
