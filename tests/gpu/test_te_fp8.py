"""The real FP8 path through TransformerEngine, against the emulation (Hopper + TE only).

Not yet run: no machine this project is tested on has had a Hopper GPU with
TransformerEngine. Each test skips with the missing piece named.

* One TE ``Linear`` under ``Float8BlockScaling`` against ``emulated_linear``: forward,
  input gradient and weight gradient agree to accumulation order and bf16 output rounding.
* ling_tiny built on TE layer specs (``fp8=blockwise``) and on local specs with the
  emulation (``fp8.emulate=true``), the same weights copied across: one forward/backward
  with FP8 on gives the same loss to 1% (the kernels around the GEMMs differ: fused
  attention, RoPE, SwiGLU in bf16).
* ``fp8=blockwise_fp8_params``: megatron-core and TE accept FP8 primary weights and
  routing-map padding; the FP8 linears hold TE quantised tensors, routers and norms do not;
  every expert's token count reaching TE's grouped GEMM is a multiple of 16; and the loss
  equals that of ``fp8=blockwise`` (no FP8 weights, no padding) on the same FP8 weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.fp8.emulation import emulated_linear
from tests.gpu.te_requirements import te_blockwise_marks

pytestmark = te_blockwise_marks()

CONFIG = [
    "+model=ling_tiny",
    "data=mock",
    "data.seq_length=32",
    "trainer.params_dtype=bf16",
    "trainer.micro_batch_size=2",
]


def _skewed(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    row_exp = torch.empty(rows, 1).uniform_(-2.0, 2.0, generator=gen)
    col_exp = torch.empty(1, cols).uniform_(-2.0, 2.0, generator=gen)
    return (torch.randn(rows, cols, generator=gen) * torch.pow(10.0, row_exp + col_exp)).cuda()


def _fp8_autocast():
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling

    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling())


def test_te_blockwise_linear_matches_emulated_linear():
    import transformer_engine.pytorch as te

    tokens, k, n = 256, 512, 384
    x = _skewed(tokens, k, 0).bfloat16()
    w = (_skewed(n, k, 1) * 1e-2).bfloat16()
    dy = _skewed(tokens, n, 2).bfloat16()

    layer = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.weight.copy_(w)
    x_te = x.clone().requires_grad_()
    with _fp8_autocast():
        y_te = layer(x_te)
    y_te.backward(dy)

    x_em, w_em = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_em = emulated_linear(x_em, w_em)
    y_em.backward(dy)

    x32, w32, dy32 = x.float(), w.float(), dy.float()
    cases = [
        ("output", y_te, y_em, x32.abs() @ w32.abs().t(), x32 @ w32.t()),
        ("input grad", x_te.grad, x_em.grad, dy32.abs() @ w32.abs(), dy32 @ w32),
        ("weight grad", layer.weight.grad, w_em.grad, dy32.abs().t() @ x32.abs(), dy32.t() @ x32),
    ]
    for what, got, want, scale, exact in cases:
        assert got.dtype == want.dtype == torch.bfloat16, what
        got, want = got.float(), want.float()
        # One bf16 step of the result (at most 2^-7 of it), plus accumulation order
        # (2^-11 of sum |a||b|).
        tol = 2.0**-7 * want.abs() + 2.0**-11 * scale
        assert ((got - want).abs() <= tol).all(), (what, ((got - want).abs() / tol).max())
        # Not FP8 at all would be caught: the exact product is outside the bound often.
        assert ((exact - want).abs() > tol).float().mean() > 0.05, what


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(compose([*CONFIG, "fp8=blockwise"]))
    yield
    destroy_distributed()


def _build(*overrides: str):
    from ling_pretrain.models.build import build_model

    (model,) = build_model(compose([*CONFIG, *overrides]))
    return model.cuda()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8192, (2, 32), generator=gen).cuda()
    return tokens, torch.arange(32, device="cuda").expand(2, 32)


def _loss(model) -> float:
    tokens, positions = _batch()
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    return loss.item()


def _as_local_name(name: str) -> str:
    """TE layer-spec parameter names -> megatron local-spec names."""
    name = re.sub(
        r"\.self_attention\.linear_qkv\.layer_norm_weight$", ".input_layernorm.weight", name
    )
    name = re.sub(r"\.mlp\.linear_fc1\.layer_norm_weight$", ".pre_mlp_layernorm.weight", name)
    m = re.match(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$", name)
    return f"{m[1]}.local_experts.{m[3]}.{m[2]}.weight" if m else name


def _hp(param: torch.Tensor) -> torch.Tensor:
    """A parameter's high-precision value (TE FP8 primary weights are dequantised)."""
    from transformer_engine.pytorch.tensor import QuantizedTensor

    return param.dequantize() if isinstance(param, QuantizedTensor) else param.detach()


def test_te_model_step_matches_the_emulated_model(world_of_one):
    te_model = _build("fp8=blockwise")
    assert type(te_model.decoder.layers[1].mlp.experts).__name__ == "TEGroupedMLP"
    assert te_model.config.fp8 == "e4m3" and te_model.config.fp8_recipe == "blockwise"
    emulated = _build("fp8=blockwise", "fp8.emulate=true")
    assert emulated.config.fp8 is None

    te_params = {_as_local_name(n): p for n, p in te_model.named_parameters()}
    em_params = dict(emulated.named_parameters())
    assert te_params.keys() == em_params.keys(), (
        sorted(te_params.keys() - em_params.keys()),
        sorted(em_params.keys() - te_params.keys()),
    )
    with torch.no_grad():
        for name, param in em_params.items():
            param.copy_(_hp(te_params[name]))

    te_loss, em_loss = _loss(te_model), _loss(emulated)
    assert abs(te_loss - em_loss) <= 1e-2 * abs(em_loss), (te_loss, em_loss)


def test_fp8_primary_weights_and_routing_padding_on_te(world_of_one):
    from transformer_engine.pytorch.tensor import QuantizedTensor

    fp8_params = _build("fp8=blockwise_fp8_params")
    config = fp8_params.config
    assert config.fp8_param and config.moe_router_padding_for_quantization
    params = dict(fp8_params.named_parameters())
    quantised = {n for n, p in params.items() if isinstance(p, QuantizedTensor)}
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in quantised
    assert any(".mlp.experts.linear_fc1.weight" in n for n in quantised)
    for name in quantised:
        assert "router" not in name and "layernorm" not in name and "embedding" not in name

    seen = []
    experts = fp8_params.decoder.layers[1].mlp.experts
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].tolist()))
    padded_loss = _loss(fp8_params)
    handle.remove()
    assert seen and all(count % 16 == 0 for count in seen[0]), seen

    # The same FP8 weights (their dequantised values re-quantise losslessly) without FP8
    # primary weights and without routing-map padding give the same loss.
    plain = _build("fp8=blockwise")
    assert not plain.config.moe_router_padding_for_quantization
    with torch.no_grad():
        for name, param in plain.named_parameters():
            param.copy_(_hp(params[name]))
    plain_loss = _loss(plain)
    assert abs(padded_loss - plain_loss) <= 1e-3 * abs(plain_loss), (padded_loss, plain_loss)
