"""HF checkpoints of the dense families written by HF transformers itself, with its logits.

transformers' own ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` is configured from a tiny
preset's fields with transformers' own constructor arguments (not through our adapter, so a
mapping mistake cannot cancel out), given random weights and random norm weights, run in fp32
with eager attention, and saved with ``save_pretrained`` (safetensors, transformers 5's
config.json spelling: ``rope_parameters``, ``dtype``). :func:`evaluate` runs
``launch/evaluate.py`` on a checkpoint as a user would. :data:`PUBLISHED` holds the
config.json files of Llama-3.1-8B and Qwen3-8B as published, with their parameter counts.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tests.conftest import REPO, script_cmd, subprocess_env

EVALUATE = REPO / "launch" / "evaluate.py"
TOLERANCE = 1e-4
"""Largest accepted |our logits - transformers' logits| in fp32."""

BATCH, SEQ = 4, 128
"""Reference tokens: 4 sequences of 128 (long enough that the llama3-scaled low RoPE
frequencies turn by a visibly different angle than unscaled ones)."""


# config.json of meta-llama/Llama-3.1-8B and Qwen/Qwen3-8B as published.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
PUBLISHED = {"llama31_8b": (LLAMA31_8B, 8_030_261_248), "qwen3_8b": (QWEN3_8B, 8_190_735_360)}


@dataclass(frozen=True)
class HFReference:
    """A transformers-written HF directory, its tokens and transformers' logits."""

    hf: Path
    tokens: Path
    logits: np.ndarray
    """``[batch, seq, vocab]`` fp32."""


def hf_config(preset: str, *, rope_scaled: bool = True):
    """transformers' config of a tiny preset (``rope_scaled=False``: Llama without its llama3
    scaling, to show the tests would notice)."""
    from transformers import LlamaConfig, Qwen3Config

    from ling_pretrain.config import compose

    m = compose([f"+model={preset}"]).model
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.layernorm_epsilon,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
        dtype="float32",
    )
    if m.family == "llama":
        rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
        if rope_scaled:
            rope = {
                "rope_type": "llama3",
                "rope_theta": float(m.rotary_base),
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        return LlamaConfig(**common, mlp_bias=False, rope_parameters=rope)
    assert m.family == "qwen3", m.family
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    return Qwen3Config(**common, use_sliding_window=False, rope_parameters=rope)


def hf_model(config, seed: int = 0):
    """A transformers causal LM of ``config`` with random weights: matrices N(0, 0.05^2),
    norm weights 1 + N(0, 0.2^2)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.05 * noise)
    return model.float().eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def write_reference(preset: str, out: Path, seed: int = 0) -> HFReference:
    """Save a random transformers model of ``preset`` to ``out/hf`` with its logits on random
    tokens (``out/tokens.npy``)."""
    config = hf_config(preset)
    model = hf_model(config, seed)
    model.save_pretrained(out / "hf")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(BATCH, SEQ), dtype=np.int32)
    np.save(out / "tokens.npy", tokens)
    return HFReference(out / "hf", out / "tokens.npy", hf_logits(model, tokens))


def evaluate(checkpoint: Path, tokens: Path, out: Path, nproc: int, extra: list[str]) -> tuple:
    """Run launch/evaluate.py as a user would; (its printed result, its saved logits)."""
    logits_file, json_file = out / "logits.npz", out / "eval.json"
    args = ["--checkpoint", str(checkpoint), "--tokens", str(tokens), "--batch-size", "2"]
    args += ["--save-logits", str(logits_file), "--output", str(json_file), *extra]
    proc = subprocess.run(
        script_cmd(EVALUATE, args, nproc),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, np.load(logits_file)["logits"]
