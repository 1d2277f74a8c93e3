"""The 8-bit Adam on its own: memory, agreement with torch AdamW, state-dict format."""

from __future__ import annotations

import copy

import pytest
import torch

from ling_pretrain.optim import MIN_8BIT_NUMEL, Adam8bit
from ling_pretrain.optim.quant import BlockCodec

HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(*sizes: int, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]


def _steps(opts_params: list, n: int, seed: int = 1) -> None:
    """``n`` steps of every (optimizer, params) pair on the same random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = [torch.randn(p.shape, generator=gen) for p in opts_params[0][1]]
        for opt, params in opts_params:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()


def test_state_bytes_per_parameter_of_a_large_shard():
    # A flat distributed-optimizer shard whose length is not a multiple of the block.
    (p,) = _params(1_000_003)
    opt = Adam8bit([p], **HYPER)
    _steps([(opt, [p])], 1)
    state = opt.state[p]
    tensors = [v for k, v in state.items() if k != "step"]
    assert {k for k in state} == {
        "step",
        "exp_avg_codes",
        "exp_avg_absmax",
        "exp_avg_sq_codes",
        "exp_avg_sq_absmax",
    }
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    assert nbytes == opt.state_bytes()
    assert nbytes / p.numel() <= 2.1
    assert nbytes / p.numel() == pytest.approx(2 + 8 / 256, rel=1e-4)
    # torch AdamW keeps 8 bytes per parameter.
    ref = torch.optim.AdamW([q := torch.nn.Parameter(p.detach().clone())], **HYPER)
    q.grad = torch.ones_like(q)
    ref.step()
    assert (
        sum(v.numel() * v.element_size() for v in ref.state[q].values() if v.dim()) == 8 * q.numel()
    )


def test_small_tensors_keep_fp32_moments_and_match_torch_adamw_exactly():
    params = _params(7, 300, MIN_8BIT_NUMEL - 1)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adam8bit(params, **HYPER)
    ref = torch.optim.AdamW(ref_params, **HYPER)
    _steps([(opt, params), (ref, ref_params)], 5)
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


def test_large_tensor_follows_torch_adamw_closely():
    params = _params(MIN_8BIT_NUMEL, 70_000)
    start = [p.detach().clone() for p in params]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adam8bit(params, **HYPER)
    ref = torch.optim.AdamW(ref_params, **HYPER)
    _steps([(opt, params), (ref, ref_params)], 20)
    for p, q, p0 in zip(params, ref_params, start, strict=True):
        assert "exp_avg_codes" in opt.state[p]
        moved = (q - p0).norm()
        assert (p - q).norm() < 0.02 * moved  # 8-bit moments: a small, not a zero, difference
        assert not torch.equal(p, q)


def test_update_equals_adamw_on_the_decoded_moments():
    """One step of Adam8bit is torch AdamW's step applied to the decoded (stored) moments."""
    (p,) = _params(10_000)
    opt = Adam8bit([p], **HYPER)
    _steps([(opt, [p])], 3)
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([q], **HYPER)
    ref.load_state_dict(opt.state_dict())
    _steps([(opt, [p]), (ref, [q])], 1, seed=7)
    assert torch.equal(p, q)


def test_state_dict_is_torch_adamw_format_with_fp32_moments():
    params = _params(10_000, 100)
    opt = Adam8bit(params, **HYPER)
    _steps([(opt, params)], 3)
    sd = opt.state_dict()
    for i, p in enumerate(params):
        s = sd["state"][i]
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and float(s["step"]) == 3
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg"].shape == p.shape
    big = opt.state[params[0]]
    decoded = BlockCodec(signed=False).decode(big["exp_avg_sq_codes"], big["exp_avg_sq_absmax"])
    assert torch.equal(sd["state"][0]["exp_avg_sq"], decoded)
    assert "exp_avg_codes" in opt.state[params[0]]  # stored state unchanged by state_dict()


def test_state_dict_round_trip_is_exact_and_continues_identically():
    params = _params(10_000, 100)
    opt = Adam8bit(params, **HYPER)
    _steps([(opt, params)], 3)
    sd = copy.deepcopy(opt.state_dict())

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Adam8bit(params2, **HYPER)
    opt2.load_state_dict(sd)
    for p, p2 in zip(params, params2, strict=True):
        assert opt.state[p].keys() == opt2.state[p2].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], opt2.state[p2][key]), key
    _steps([(opt, params), (opt2, params2)], 3, seed=5)
    for p, p2 in zip(params, params2, strict=True):
        assert torch.equal(p, p2)


def test_loads_plain_adamw_state_and_plain_adamw_loads_it():
    params = _params(10_000, 100)
    ref = torch.optim.AdamW(params, **HYPER)
    _steps([(ref, params)], 3)
    opt = Adam8bit([torch.nn.Parameter(p.detach().clone()) for p in params], **HYPER)
    opt.load_state_dict(ref.state_dict())
    sd = opt.state_dict()
    for i in range(2):
        assert float(sd["state"][i]["step"]) == 3
        exact, stored = ref.state[params[i]]["exp_avg"], sd["state"][i]["exp_avg"]
        if i == 0:  # quantised: close, not equal
            assert not torch.equal(exact, stored)
            assert (exact - stored).abs().max() <= 0.0071 * exact.abs().max()
        else:
            assert torch.equal(exact, stored)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], **HYPER)
    back.load_state_dict(sd)
    assert torch.equal(back.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])


def test_memory_model_uses_this_optimizers_layout():
    from ling_pretrain.memory import breakdown as memory
    from ling_pretrain.optim.quant import BLOCK

    assert memory.BNB_BLOCK == BLOCK and memory.BNB_MIN_8BIT_SIZE == MIN_8BIT_NUMEL
    # The memory model's bytes per shard equal the state this optimizer really holds.
    params = _params(1_000_003, MIN_8BIT_NUMEL, MIN_8BIT_NUMEL - 1)
    opt = Adam8bit(params, **HYPER)
    _steps([(opt, params)], 1)
    for p in params:
        held = sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")
        assert held == memory._adam_state_bytes("adam8bit", p.numel())
