"""Ling's training semantics on the real megatron-core model: MTP loss weighting and the
expert-bias update rules, checked against the formulas in numbers, alone and on two processes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, script_cmd, subprocess_env

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("mcore_worker.py")
BASE = [
    "+model=ling_tiny",
    "data=mock",
    "data.seq_length=32",
    "trainer.micro_batch_size=2",
    "trainer.params_dtype=fp32",
    "parallel.use_distributed_optimizer=false",
]


def run_worker(mode: str, out: Path, overrides: list[str], nproc: int) -> list[dict]:
    cmd = script_cmd(WORKER, [mode, str(out), *BASE, *overrides], nproc)
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


LAYOUTS = {
    "single": (1, ["trainer.global_batch_size=4"]),
    "dp2": (2, ["trainer.global_batch_size=8"]),
    "ep2": (2, ["trainer.global_batch_size=8", "parallel.expert_model_parallel_size=2"]),
    # bf16 weights: the bias and its update must stay fp32 (upstream bugs made it bf16).
    "single_bf16": (1, ["trainer.global_batch_size=4", "trainer.params_dtype=bf16"]),
}


@pytest.mark.parametrize("layout", ["single", "dp2"])
def test_mtp_gradient_is_ling_per_token_mean(tmp_path, layout):
    """Finalised gradients equal autograd of lm_sum / N + 0.1 * mtp_sum / M (global counts).

    Micro-batches have different loss masks, so megatron-core 0.16.1's weighting
    (``M / N``) and a per-micro-batch ``N_i / M_i`` rescaling both give other numbers.
    """
    nproc, extra = LAYOUTS[layout]
    results = run_worker("mtp_grad", tmp_path, [*extra, "model.moe_z_loss_coeff=0"], nproc)
    for r in results:
        assert r["m"] < r["n"]
        scale = max(r["max_abs_grad"])
        assert max(r["max_abs_diff_ling"]) <= 1e-6 * max(scale, 1.0)
        # The check can tell the weightings apart by far more than its tolerance.
        assert max(r["max_abs_ling_vs_0_16"]) > 100 * max(r["max_abs_diff_ling"])
        assert max(r["max_abs_diff_megatron_0_16"]) > 1e-5
        # Every parameter gets a gradient from the formula (nothing silently dropped).
        assert all(g > 0 for g in r["max_abs_grad"]), [
            n for n, g in zip(r["names"], r["max_abs_grad"], strict=True) if g == 0
        ]


def expected_bias(before: torch.Tensor, counts: torch.Tensor, rate: float, rule: str):
    delta = torch.sign(counts.mean(dim=1, keepdim=True) - counts)
    if rule == "zero_mean":
        delta = delta - delta.mean(dim=1, keepdim=True)
    return before + rate * delta


@pytest.mark.parametrize("layout", ["single", "ep2", "single_bf16"])
def test_expert_bias_update_rules(tmp_path, layout):
    nproc, extra = LAYOUTS[layout]
    rate = 0.01
    # Two groups of four experts, top-2 inside the best group: loads that the two rules
    # update differently (ling_tiny's groups of two always route both experts of a group).
    routing = [
        "model.moe_router_num_groups=2",
        "model.moe_router_group_topk=1",
        "model.moe_router_topk=2",
        f"model.moe_router_bias_update_rate={rate}",
    ]
    results = run_worker("bias", tmp_path, [*extra, *routing], nproc)
    tokens = (4 if nproc == 1 else 8) * 32  # global batch x sequence length
    for r in results:
        dtype = "torch.bfloat16" if "trainer.params_dtype=bf16" in extra else "torch.float32"
        assert r["params_dtype"] == dtype
        megatron, zero_mean = r["megatron"], r["zero_mean"]
        assert megatron["counts"] == zero_mean["counts"]  # same biases, same batch
        counts = torch.tensor(megatron["counts"], dtype=torch.float64)
        # 3 decoder MoE layers and the MTP layer, each routing every token to 2 experts.
        assert counts.shape == (4, 8)
        assert torch.all(counts.sum(dim=1) == tokens * 2)
        before = torch.tensor(megatron["before"], dtype=torch.float64)
        for rule, rec in (("megatron", megatron), ("zero_mean", zero_mean)):
            assert set(rec["dtype"]) == {"torch.float32"}
            after = torch.tensor(rec["after"], dtype=torch.float64)
            want = expected_bias(before, counts, rate, rule)
            assert torch.allclose(after, want, atol=1e-7, rtol=0), (rule, after - want)
        moved = torch.tensor(zero_mean["after"], dtype=torch.float64) - before
        assert moved.mean(dim=1).abs().max() < 1e-8  # zero-mean keeps each layer's mean
        # The rules differ on this batch (an odd split of over/under-loaded experts).
        plain = torch.tensor(megatron["after"], dtype=torch.float64) - before
        assert plain.mean(dim=1).abs().max() > rate / 10
    if nproc > 1:
        assert results[0]["zero_mean"]["after"] == results[1]["zero_mean"]["after"]
