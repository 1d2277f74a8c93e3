"""An HF-layout Ling 2.0 checkpoint written by an independent implementation, with its logits.

NeMo AutoModel's ``BailingMoeV2ForCausalLM`` (PyPI ``nemo-automodel``, installed with
``--no-deps`` next to ``transformers``) is built on CPU in fp32 with its torch/sdpa backends,
given random weights, random norm weights and a random non-zero expert bias, and its own
state-dict adapter writes the HF layout. NeMo does not model MTP, so the MTP layer is made of
NeMo parts by the formula of Ling's MTP: an extra NeMo MoE block (HF layer
``num_hidden_layers``) plus random ``enorm``/``hnorm``/``eh_proj``/``final_layernorm``:

    h = main model output after the final norm           (NeMo's forward)
    e = embedding(input ids rolled left by one, last id 0)
    z = final_layernorm(block(eh_proj(concat[enorm(e), hnorm(h)])))
    mtp_logits = lm_head(z)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# A tiny config inside ling_pretrain's validation rules: topk == 2 x group_topk (HF's top-2
# group score), heads / query groups / experts / layers divisible by 2 for TP2, EP2 and PP2.
HF_CONFIG = {
    "model_type": "bailing_moe_v2",
    "architectures": ["BailingMoeV2ForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": False,
    "use_qk_norm": True,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "rope_scaling": None,
    "num_experts": 8,
    "num_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "num_nextn_predict_layers": 1,
    "mtp_loss_scaling_factor": 0.1,
    "torch_dtype": "float32",
}


def _nemo_model(num_layers: int):
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.ling_v2.config import BailingMoeV2Config
    from nemo_automodel.components.models.ling_v2.model import BailingMoeV2ForCausalLM

    fields = {k: v for k, v in HF_CONFIG.items() if k not in ("model_type", "architectures")}
    fields["num_hidden_layers"] = num_layers
    fields["num_nextn_predict_layers"] = 0
    config = BailingMoeV2Config(**fields)
    backend = BackendConfig(
        attn="sdpa",
        linear="torch",
        rms_norm="torch",
        rope_fusion=False,
        experts="torch",
        dispatcher="torch",
    )
    model = BailingMoeV2ForCausalLM(config, backend=backend)
    model.initialize_weights(buffer_device=torch.device("cpu"), dtype=torch.float32)
    return model.eval()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight


def build(out_dir: Path, seed: int = 0, rows: int = 4, seq_length: int = 32) -> dict:
    """Write ``out_dir/hf`` (config.json + safetensors), ``tokens.npy`` and ``reference.npz``
    (NeMo's ``logits`` and the formula's ``mtp_logits``, fp32). Returns the paths."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    n = HF_CONFIG["num_hidden_layers"]
    # n + 1 layers: the last one is the MTP layer's transformer block (an MoE block).
    holder = _nemo_model(n + 1)
    with torch.no_grad():
        for p in holder.parameters():
            if p.dim() == 1:  # norm weights: away from 1 so a swapped norm shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for name, b in holder.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    main = _nemo_model(n)
    missing, unexpected = main.load_state_dict(holder.state_dict(), strict=False)
    assert not missing and all(k.startswith(f"model.layers.{n}.") for k in unexpected)

    hidden, eps = HF_CONFIG["hidden_size"], HF_CONFIG["rms_norm_eps"]
    g = torch.Generator().manual_seed(seed + 1)
    mtp = {
        "enorm.weight": 1.0 + 0.2 * torch.randn(hidden, generator=g),
        "hnorm.weight": 1.0 + 0.2 * torch.randn(hidden, generator=g),
        "eh_proj.weight": 0.08 * torch.randn(hidden, 2 * hidden, generator=g),
        "final_layernorm.weight": 1.0 + 0.2 * torch.randn(hidden, generator=g),
    }
    hf = {
        k: v.contiguous() for k, v in holder.state_dict_adapter.to_hf(holder.state_dict()).items()
    }
    hf.update({f"model.layers.{n}.{k}": v for k, v in mtp.items()})
    assert hf[f"model.layers.{n - 1}.mlp.gate.expert_bias"].abs().min() > 0

    hf_dir = out_dir / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(HF_CONFIG, indent=2))

    tokens = torch.randint(0, HF_CONFIG["vocab_size"], (rows, seq_length), generator=g)
    np.save(out_dir / "tokens.npy", tokens.numpy().astype(np.int32))
    with torch.no_grad():
        logits = main(tokens).logits.float()
        h = main.model(tokens)  # after the final norm
        from nemo_automodel.components.models.gpt_oss.rope_utils import (
            position_ids_to_freqs_cis,
        )

        shifted = torch.roll(tokens, shifts=-1, dims=-1)
        shifted[:, -1] = 0
        e = main.model.embed_tokens(shifted)
        x = torch.cat([_rms(e, mtp["enorm.weight"], eps), _rms(h, mtp["hnorm.weight"], eps)], -1)
        x = x @ mtp["eh_proj.weight"].t()
        positions = torch.arange(seq_length).expand(rows, seq_length)
        freqs = position_ids_to_freqs_cis(
            holder.model.rotary_emb, positions, qkv_format="bshd", for_fused_rope=False
        )
        z = holder.model.layers[str(n)](x, freqs_cis=freqs)
        z = _rms(z, mtp["final_layernorm.weight"], eps)
        mtp_logits = main.lm_head(z).float()
    np.savez(out_dir / "reference.npz", logits=logits.numpy(), mtp_logits=mtp_logits.numpy())
    return {
        "hf_dir": hf_dir,
        "tokens": out_dir / "tokens.npy",
        "reference": out_dir / "reference.npz",
    }


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1])))
