"""Routing-map padding for FP8 grouped GEMMs changes no number (megatron-core's own code).

FP8 grouped GEMMs need every expert's token count to be a multiple of 16 (32 for MXFP8).
megatron-core's ``moe_router_padding_for_quantization`` gets there inside the alltoall token
dispatcher: ``pad_routing_map`` marks, for each expert, the first tokens *not* routed to it
as routed, and the permutation gathers their probability from the router's dense
``[tokens, experts]`` matrix, where it is 0. A padded token therefore runs through the
expert and contributes ``0 * expert(x)`` to the output, and no gradient.

megatron's config validation accepts the flag only with FP8 on, and FP8 needs
TransformerEngine, so on CPU these tests build the model as usual and then set the flags on
its (already validated) ``TransformerConfig``: ``moe_router_padding_for_quantization``, and
``fp8`` / ``fp8_recipe`` so that megatron's ``get_align_size_for_quantization`` picks the
recipe's alignment from its own table (16, or 32 for mxfp8; without ``fp8``, 0.16.1 falls
back to 16 and 0.19.2 to 0, which fails in ``pad_routing_map``). Nothing else in the MoE
layer's forward reads ``fp8`` except megatron 0.16.1's ``SequentialMLP``, which then pads
each expert's tokens itself, a no-op once the routing map is aligned. What runs is
megatron's real router, dispatcher, padding, permutation, experts and unpermutation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from ling_pretrain.config import compose

CONFIG = ["+model=ling_tiny", "data=mock", "data.seq_length=32", "trainer.params_dtype=fp32"]
ALIGN = {"blockwise": 16, "mxfp8": 32}
SEQ, BATCH, HIDDEN = 32, 2, 128  # 64 tokens, top-4 of 8 experts: 25-39 tokens per expert


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    """A gloo world of one with megatron's parallel state, on the CPU runtime."""
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(compose(CONFIG))
    yield
    destroy_distributed()


def _assert_unchanged(plain: dict, padded: dict) -> None:
    for what in ("output", "input grad"):
        assert torch.equal(plain[what], padded[what]), what
    assert plain["grads"].keys() == padded["grads"].keys()
    for name, grad in plain["grads"].items():
        assert torch.equal(grad, padded["grads"][name]), name


def _moe_layer(*overrides: str):
    """The first MoE layer (decoder layer 1) of a freshly built ling_tiny."""
    from ling_pretrain.models.build import build_model

    (model,) = build_model(compose([*CONFIG, *overrides]))
    layer = model.decoder.layers[1].mlp
    assert type(layer).__name__ == "MoELayer"
    assert type(layer.token_dispatcher).__name__ == "MoEAlltoAllTokenDispatcher"
    return layer


@contextlib.contextmanager
def _padding(config, recipe: str) -> Iterator[int]:
    """Turns megatron's routing-map padding on for ``recipe``; yields megatron's alignment."""
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

    names = ("moe_router_padding_for_quantization", "fp8", "fp8_recipe")
    saved = {name: getattr(config, name) for name in names}
    config.moe_router_padding_for_quantization = True
    config.fp8, config.fp8_recipe = "e4m3", recipe
    try:
        yield get_align_size_for_quantization(config)
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def _run(layer, seed: int = 0) -> dict:
    """One forward and backward of ``layer`` on fixed data; what the experts saw, and grads."""
    seen = {}

    def grab(module, args):
        seen["tokens_per_expert"] = args[1].detach().clone().long()
        seen["probs"] = args[2].detach().clone()

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).requires_grad_()
    dy = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    layer.zero_grad(set_to_none=True)
    layer.router.local_tokens_per_expert.zero_()
    handle = layer.experts.register_forward_pre_hook(grab)
    try:
        y, _ = layer(x)
        y.backward(dy)
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    assert any(".local_experts." in n for n in grads) and "router.weight" in grads
    return {
        **seen,
        "output": y.detach(),
        "input grad": x.grad,
        "grads": grads,
        # What the expert-bias update counts: must not include padded tokens.
        "router counts": layer.router.local_tokens_per_expert.clone(),
    }


def _check_padding(plain: dict, padded: dict, align: int, senders: int = 1) -> None:
    """Counts aligned, padded entries exactly the probability-0 ones, bias counts unchanged.

    ``senders``: ranks whose (each padded) tokens reach these experts (the EP size).
    """
    before, after = plain["tokens_per_expert"], padded["tokens_per_expert"]
    assert (before % align != 0).any(), before  # padding really happens
    assert (after % align == 0).all(), after
    assert ((after - before >= 0) & (after - before < senders * align)).all(), (before, after)
    # The padded entries, and only they, carry probability 0.
    zero = [int((p == 0).sum()) for p in torch.split(padded["probs"], after.tolist())]
    assert zero == (after - before).tolist()
    assert (plain["probs"] != 0).all()
    assert torch.equal(plain["router counts"], padded["router counts"])


@pytest.mark.parametrize("recipe", sorted(ALIGN))
def test_padding_aligns_expert_tokens_and_changes_no_number(world_of_one, recipe):
    layer = _moe_layer()
    plain = _run(layer)
    with _padding(layer.config, recipe) as align:
        padded = _run(layer)
    assert align == ALIGN[recipe]
    _check_padding(plain, padded, align)
    _assert_unchanged(plain, padded)


@pytest.mark.parametrize("recipe", sorted(ALIGN))
def test_padding_under_emulated_fp8(world_of_one, recipe):
    """With the recipe's quantisation emulated on every expert GEMM.

    Forward and dgrad quantise each token's row on its own (tiles along hidden / ffn), so
    extra rows cannot change the other rows: output and input gradient stay bit-equal.
    wgrad tiles run along tokens, and padded tokens share tiles with routed ones (their
    output gradient enters fc2's, their input fc1's); with power-of-2 scales that moves
    only elements tiny next to their tile's amax, so expert weight gradients agree to
    fp32 rounding rather than bit for bit.
    """
    from ling_pretrain.fp8.emulation import fp8_emulation_stats

    layer = _moe_layer(f"fp8={recipe}", "fp8.emulate=true")
    plain = _run(layer)
    with fp8_emulation_stats() as stats, _padding(layer.config, recipe) as align:
        padded = _run(layer)
    assert stats.wgrad == 2 * 8 + 2  # fc1/fc2 of 8 experts and of the shared expert
    _check_padding(plain, padded, align)
    for what in ("output", "input grad"):
        assert torch.equal(plain[what], padded[what]), what
    for name, grad in plain["grads"].items():
        diff = (grad - padded["grads"][name]).abs().max()
        assert diff <= 1e-5 * grad.abs().max(), (name, diff)
        if ".local_experts." not in name:
            assert torch.equal(grad, padded["grads"][name]), name


def test_padding_changes_per_tensor_scales(world_of_one):
    """Per-tensor (current) scaling is the exception: not neutral.

    A padded token is a real token with probability 0; under ``tensorwise`` its hidden
    state enters the expert input's amax, so the one scale of that tensor, and with it the
    rounding of every routed token, can change.
    """
    layer = _moe_layer("fp8=tensorwise", "fp8.emulate=true")
    plain = _run(layer)
    with _padding(layer.config, "tensorwise") as align:
        padded = _run(layer)
    assert align == 16
    _check_padding(plain, padded, align)
    diff = (plain["output"] - padded["output"]).abs().max()
    # Different rounding, within E4M3's 2^-4 relative step of each product.
    assert 0 < diff < 0.1 * plain["output"].abs().max()


@pytest.mark.distributed
def test_padding_under_expert_parallelism():
    """EP2 (alltoall between two gloo processes): each rank pads its own routing map."""
    from tests.fp8.torchrun_worker import run_worker

    stdout = run_worker(__file__)
    for recipe in sorted(ALIGN):
        for rank in (0, 1):
            assert f"ok ep2 {recipe} rank {rank}" in stdout, stdout


def _worker() -> None:
    """Each rank routes its own tokens to 4 local experts of 8; the counts reaching an
    expert are the sum of both ranks' padded counts."""
    import torch.distributed as dist

    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    ep2 = "parallel.expert_model_parallel_size=2"
    init_distributed(compose([*CONFIG, ep2]))
    try:
        rank = dist.get_rank()
        layer = _moe_layer(ep2)
        assert layer.num_local_experts == 4
        for recipe in sorted(ALIGN):
            plain = _run(layer, seed=rank)
            with _padding(layer.config, recipe) as align:
                padded = _run(layer, seed=rank)
            _check_padding(plain, padded, align, senders=2)
            _assert_unchanged(plain, padded)
            print(f"ok ep2 {recipe} rank {rank}", flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _worker()
