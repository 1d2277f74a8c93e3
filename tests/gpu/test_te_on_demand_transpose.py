"""On-demand transpose of FP8 primary weights on TransformerEngine (Hopper + TE only).

Not yet run: no machine this project is tested on has had a Hopper GPU with
TransformerEngine. Each test skips with the missing piece named.

* A TE ``Linear`` and a ``GroupedLinear`` built with FP8 primary weights under
  ``Float8BlockScaling``, one with :func:`install` and one without, from the same seed: after
  each backward the hooked weights hold only their row-wise FP8 data while the stock ones
  keep the column-wise copy, and outputs, input gradients and weight gradients are bit-equal
  over two steps.
* ling_tiny with ``fp8=blockwise_fp8_params`` (on-demand transpose on, installed by the
  builder) against the same model with ``fp8.on_demand_transpose=false`` and the same FP8
  weights: every FP8 weight is a 128x128-scaled blockwise tensor; after backward and after
  megatron-core's post-all-gather processing none holds a column-wise copy (the stock model's
  do); loss and every gradient agree to summation order (token permutation's atomics).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.fp8.te_on_demand_transpose import has_columnwise_copy, install, is_2d_blockwise
from tests.gpu.te_requirements import te_blockwise_marks

pytestmark = te_blockwise_marks()


def _recipe():
    from transformer_engine.common.recipe import Float8BlockScaling

    return Float8BlockScaling()


def _model_init():
    import transformer_engine.pytorch as te

    init = getattr(te, "quantized_model_init", None) or te.fp8_model_init
    return init(enabled=True, recipe=_recipe())


def _autocast():
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=_recipe())


def _pair(make):
    """Two modules with FP8 primary weights from the same seed; the first hooked."""
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        torch.cuda.manual_seed(0)
        with _model_init():
            modules.append(make())
    assert install([modules[0]]) == 1
    return modules


def _fp8_weights(module) -> list:
    weights = [p for p in module.parameters() if hasattr(p, "_rowwise_data")]
    assert weights and all(is_2d_blockwise(w) for w in weights)
    return weights


@pytest.mark.parametrize("kind", ["linear", "grouped"])
def test_te_module_keeps_only_rowwise_fp8_weights(kind):
    import transformer_engine.pytorch as te

    k, n, splits = 256, 384, [128, 64, 256, 128]
    if kind == "linear":
        hooked, stock = _pair(lambda: te.Linear(k, n, bias=False, params_dtype=torch.bfloat16))
        tokens = 256
    else:
        hooked, stock = _pair(
            lambda: te.GroupedLinear(len(splits), k, n, bias=False, params_dtype=torch.bfloat16)
        )
        tokens = sum(splits)
    for a, b in zip(_fp8_weights(hooked), _fp8_weights(stock), strict=True):
        assert torch.equal(a._rowwise_data, b._rowwise_data)
        assert not has_columnwise_copy(a)

    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(tokens, k, generator=gen).cuda().bfloat16()
        dy = torch.randn(tokens, n, generator=gen).cuda().bfloat16()
        results = []
        for module in (hooked, stock):
            for p in module.parameters():
                p.grad = None
            xi = x.clone().requires_grad_()
            with _autocast():
                y = module(xi) if kind == "linear" else module(xi, splits)
            y.backward(dy)
            grads = [p.grad.clone() for p in module.parameters()]
            results.append((y.detach(), xi.grad, grads))
        (y_h, dx_h, g_h), (y_s, dx_s, g_s) = results
        assert torch.equal(y_h, y_s) and torch.equal(dx_h, dx_s), step
        assert all(torch.equal(a, b) for a, b in zip(g_h, g_s, strict=True)), step
        assert not any(has_columnwise_copy(w) for w in _fp8_weights(hooked)), step
        # The check could fail: stock TE keeps the column-wise copy it built in backward.
        assert all(has_columnwise_copy(w) for w in _fp8_weights(stock)), step


CONFIG = [
    "+model=ling_tiny",
    "data=mock",
    "data.seq_length=32",
    "trainer.params_dtype=bf16",
    "trainer.micro_batch_size=2",
]


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(compose([*CONFIG, "fp8=blockwise_fp8_params"]))
    yield
    destroy_distributed()


def _build(*overrides: str):
    from ling_pretrain.models.build import build_model

    (model,) = build_model(compose([*CONFIG, *overrides]))
    return model.cuda()


def _loss_and_grads(model) -> tuple[float, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8192, (2, 32), generator=gen).cuda()
    positions = torch.arange(32, device="cuda").expand(2, 32)
    for p in model.parameters():
        p.grad = None
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_ling_tiny_on_demand_transpose_matches_cached_transpose(world_of_one):
    from megatron.core import fp8_utils
    from megatron.core.distributed import param_and_grad_buffer
    from transformer_engine.pytorch.tensor import QuantizedTensor

    on_demand = _build("fp8=blockwise_fp8_params")
    assert on_demand.config.fp8_param
    cached = _build("fp8=blockwise_fp8_params", "fp8.on_demand_transpose=false")
    params = dict(on_demand.named_parameters())
    fp8 = [p for p in params.values() if isinstance(p, QuantizedTensor)]
    assert fp8 and all(is_2d_blockwise(p) for p in fp8)
    with torch.no_grad():
        for name, param in cached.named_parameters():
            value = params[name]
            param.copy_(value.dequantize() if isinstance(value, QuantizedTensor) else value)
    cached_fp8 = [p for p in cached.parameters() if isinstance(p, QuantizedTensor)]
    for a, b in zip(fp8, cached_fp8, strict=True):
        assert torch.equal(a._rowwise_data, b._rowwise_data)

    for _ in range(2):
        loss_a, grads_a = _loss_and_grads(on_demand)
        loss_b, grads_b = _loss_and_grads(cached)
        # Same FP8 operands; only the order of atomic additions in token permutation may
        # differ between two runs, so allow summation-order noise (a stale or wrong transpose
        # moves gradients by whole FP8 steps).
        assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_b), (loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys()
        for name, grad in grads_a.items():
            want = grads_b[name].float()
            tol = 1e-3 * want.abs().max().item() + 1e-12
            assert (grad.float() - want).abs().max().item() <= tol, name
        assert not any(has_columnwise_copy(p) for p in fp8)
        assert any(has_columnwise_copy(p) for p in cached_fp8)
        # What megatron-core runs after each parameter all-gather (optimizer step):
        # patched, it leaves the on-demand model's weights row-wise only.
        param_and_grad_buffer.post_all_gather_processing(fp8)
        assert not any(has_columnwise_copy(p) for p in fp8)
        fp8_utils.post_all_gather_processing(cached_fp8)
        assert all(has_columnwise_copy(p) for p in cached_fp8)
