"""``launch/evaluate.py`` on a checkpoint written by HF transformers' own ``LlamaForCausalLM``
/ ``Qwen3ForCausalLM`` gives transformers' logits (fp32, to 1e-4) at TP1 and TP2.

The model comes from the checkpoint's config.json alone (no ``+model=``); TP2 runs without
sequence parallelism, which dense models do not need. Two controls show the comparison is
sharp enough to notice a missing feature: transformers' Llama without its llama3 RoPE
scaling, and Qwen3 with its QK-norm weights reset to one, are each far outside the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.hf_dense import (
    TOLERANCE,
    HFReference,
    evaluate,
    hf_config,
    hf_logits,
    hf_model,
    write_reference,
)

pytestmark = pytest.mark.distributed

PRESETS = ("llama_tiny", "qwen3_tiny")
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["parallel.tensor_model_parallel_size=2"])}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, HFReference]:
    return {p: write_reference(p, tmp_path_factory.mktemp(p)) for p in PRESETS}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _ce(logits: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.take_along_axis(_log_softmax(logits), targets[..., None], axis=-1).mean())


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_checkpoint_gives_transformers_logits(references, tmp_path, preset, layout):
    ref = references[preset]
    nproc, extra = LAYOUTS[layout]
    result, logits = evaluate(ref.hf, ref.tokens, tmp_path, nproc, extra)
    assert result["checkpoint_format"] == "hf" and result["params_dtype"] == "fp32"
    assert result["mtp_loss"] is None
    assert logits.dtype == np.float32 and logits.shape == ref.logits.shape
    diff = float(np.abs(logits - ref.logits).max())
    print(f"{preset} {layout}: max |logits - transformers| = {diff:.2e}")
    assert diff <= TOLERANCE
    tokens = np.load(ref.tokens).astype(np.int64)
    assert result["lm_loss"] == pytest.approx(_ce(ref.logits[:, :-1], tokens[:, 1:]), abs=1e-5)
    assert result["lm_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)


def test_llama_without_rope_scaling_is_far_off(references):
    ref = references["llama_tiny"]
    plain = hf_model(hf_config("llama_tiny", rope_scaled=False))
    diff = np.abs(hf_logits(plain, np.load(ref.tokens)) - ref.logits).max()
    assert diff > 100 * TOLERANCE


def test_qwen3_without_qk_norm_weights_is_far_off(references):
    ref = references["qwen3_tiny"]
    model = hf_model(hf_config("qwen3_tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.fill_(1.0)
    diff = np.abs(hf_logits(model, np.load(ref.tokens)) - ref.logits).max()
    assert diff > 100 * TOLERANCE
