"""``launch/convert.py`` on checkpoints written by HF transformers' own ``LlamaForCausalLM`` /
``Qwen3ForCausalLM``: hf-to-mcore then mcore-to-hf gives back every tensor bit for bit (fp32),
across TP1 and TP2 layouts; transformers reads the export as the same model; and the megatron
checkpoint in between evaluates to transformers' logits. The model always comes from the
checkpoint (config.json, then the converted checkpoint's config.yaml), never from +model=."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checkpoint.conftest import assert_same_tensors, read_all, run_convert
from tests.models.hf_dense import TOLERANCE, HFReference, evaluate, hf_logits, write_reference

pytestmark = pytest.mark.distributed

PRESETS = ("llama_tiny", "qwen3_tiny")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, HFReference]:
    return {p: write_reference(p, tmp_path_factory.mktemp(p), seed=1) for p in PRESETS}


def _transformers_logits(hf_dir, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return hf_logits(model, tokens)


@pytest.mark.parametrize("import_tp,export_tp", [(2, 1), (1, 2)], ids=["tp2-to-tp1", "tp1-to-tp2"])
@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_is_bit_exact(references, tmp_path, preset, import_tp, export_tp):
    ref = references[preset]
    mcore, back = tmp_path / "mcore", tmp_path / "hf"
    run_convert(
        ["hf-to-mcore", "--hf-dir", str(ref.hf), "--out-dir", str(mcore), "--tp", str(import_tp)],
        nproc=import_tp,
    )
    args = ["mcore-to-hf", "--checkpoint", str(mcore), "--out-dir", str(back), "--dtype", "fp32"]
    run_convert([*args, "--tp", str(export_tp)], nproc=export_tp)
    source, exported = read_all(ref.hf), read_all(back)
    assert all(t.dtype.is_floating_point and t.itemsize == 4 for t in source.values())
    assert_same_tensors(source, exported)

    tokens = np.load(ref.tokens)
    diff = float(np.abs(_transformers_logits(back, tokens) - ref.logits).max())
    assert diff <= 1e-6, f"transformers reads the export as another model ({diff:.2e})"

    if import_tp == 2:
        result, logits = evaluate(mcore, ref.tokens, tmp_path, 1, [])
        assert result["checkpoint_format"] == "megatron" and result["params_dtype"] == "fp32"
        assert float(np.abs(logits - ref.logits).max()) <= TOLERANCE
