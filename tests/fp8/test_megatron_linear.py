"""megatron's parallel linear layers with emulated FP8 GEMMs, and the specs that use them.

Three things are checked:

1. The layers compute exactly ``emulated_linear`` (bit for bit, fp32 and bf16), and on
   data that FP8 represents exactly (small integers: quantisation is lossless and every
   fp32 sum is exact in any order) they compute exactly what megatron's own layers do,
   for every recipe. The same holds with two tensor-parallel processes, with and without
   sequence parallelism (the torchrun worker at the bottom of this file), which pins the
   all-gather / reduce-scatter / all-reduce semantics to megatron's.
2. ``emulated_fp8_layer_specs`` converts exactly the linear layers that run in FP8 and
   leaves the embedding, output layer, routers, BF16 layers and (by default) MTP's
   ``eh_proj`` alone.
3. A TP2 + sequence-parallel run of the real entry point reproduces the single-process
   first-step loss under emulation.

The model-level tests build through ``ling_pretrain.models.ling.builder``, so they need
the builder to call ``emulated_fp8_layer_specs`` when ``fp8.emulate`` is set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Iterator

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.fp8.emulation import FP8EmulationSpec, emulated_linear, fp8_emulation_stats

CONFIG = ["+model=ling_tiny", "data=mock", "data.seq_length=32"]
RECIPES = ("blockwise", "tensorwise", "mxfp8")
# 100 x 2 = 200 tokens, 320 in-features, 160 out-features: none a multiple of 128.
SEQ, BATCH, IN, OUT = 100, 2, 320, 160


def _skewed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Magnitudes varying over five decades along rows and along columns.

    With power-of-2 scales two tilings of a tensor only disagree on elements that are
    tiny next to their tile's amax; skewing both axes makes those common, so a tile
    taken along the wrong dimension changes the result.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    row_exp = torch.empty(rows, 1).uniform_(-2.5, 2.5, generator=gen)
    col_exp = torch.empty(1, cols).uniform_(-2.5, 2.5, generator=gen)
    x = torch.randn(rows, cols, generator=gen) * torch.pow(10.0, row_exp + col_exp)
    return x.reshape(shape)


def _fp8_exact(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Integers in [-7, 7] with amax exactly 7: every recipe quantises them losslessly.

    Integers up to 7 need at most 2 mantissa bits (E5M2 has 2, E4M3 3); power-of-2 scales
    keep them integers times a power of two, without overflow; and the per-tensor scales
    of ``tensorwise`` are exact because fp8_max / 7 is a power of two (448 / 7 = 64,
    57344 / 7 = 8192). Products and sums stay far below 2^24, so fp32 GEMMs and
    all-reduces are exact in any order.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-7, 8, shape, generator=gen).float()
    x.view(-1)[0] = 7.0
    return x


def _megatron_config(*overrides: str):
    from ling_pretrain.models.mcore import build_transformer_config

    return build_transformer_config(compose([*CONFIG, *overrides]))


def _emulation(recipe: str):
    from ling_pretrain.fp8.megatron_linear import emulation_for_config

    return emulation_for_config(compose([*CONFIG, f"fp8.recipe={recipe}"]).fp8)


def _classes() -> dict[str, tuple[type, type]]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from ling_pretrain.fp8.megatron_linear import (
        EmulatedFP8ColumnParallelLinear,
        EmulatedFP8RowParallelLinear,
    )

    return {
        "column": (ColumnParallelLinear, EmulatedFP8ColumnParallelLinear),
        "row": (RowParallelLinear, EmulatedFP8RowParallelLinear),
    }


def _layer(cls: type, config, **extra):
    """A bias-free IN -> OUT layer (Ling has no biases), as the model builds them."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    kwargs = dict(config=config, init_method=torch.nn.init.zeros_, bias=False, **extra)
    if issubclass(cls, ColumnParallelLinear):
        return cls(IN, OUT, gather_output=False, skip_bias_add=False, **kwargs)
    return cls(IN, OUT, input_is_parallel=True, skip_bias_add=False, **kwargs)


def _run_layer(layer, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor):
    """(output, input grad, weight grad) of one forward and backward."""
    with torch.no_grad():
        layer.weight.copy_(weight)
    x = x.clone().requires_grad_()
    y, bias = layer(x)
    assert bias is None
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


def _assert_equal(got, want, what: str) -> None:
    for name, a, b in zip(("output", "input grad", "weight grad"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name, a.dtype, b.dtype)
        assert torch.equal(a, b), f"{what}: {name} differs by up to {(a - b).abs().max()}"


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to fp32 summation order: 1e-6 of the largest magnitude."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-6 * b.abs().max(), (a - b).abs().max()


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    """A gloo world of one with megatron's parallel state, on the CPU runtime."""
    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(compose(CONFIG))
    yield
    destroy_distributed()


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_layers_compute_emulated_linear_bit_for_bit(world_of_one, kind, dtype):
    _, emulated_cls = _classes()[kind]
    config = _megatron_config(f"trainer.params_dtype={dtype}")
    x = _skewed((SEQ, BATCH, IN), seed=0).to(config.params_dtype)
    w = (_skewed((OUT, IN), seed=1) * 1e-2).to(config.params_dtype)
    dy = _skewed((SEQ, BATCH, OUT), seed=2).to(config.params_dtype)

    with fp8_emulation_stats() as stats:
        got = _run_layer(_layer(emulated_cls, config), w, x, dy)
    assert (stats.forward, stats.dgrad, stats.wgrad) == (1, 1, 1)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = emulated_linear(xr, wr, FP8EmulationSpec())
    yr.backward(dy)
    _assert_equal(got, (yr.detach(), xr.grad, wr.grad), f"{kind} {dtype}")


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_layers_match_megatron_when_fp8_is_exact(world_of_one, kind, recipe):
    megatron_cls, emulated_cls = _classes()[kind]
    config = _megatron_config()
    x, w = _fp8_exact((SEQ, BATCH, IN), 0), _fp8_exact((OUT, IN), 1)
    dy = _fp8_exact((SEQ, BATCH, OUT), 2)
    want = _run_layer(_layer(megatron_cls, config), w, x, dy)
    with fp8_emulation_stats() as stats:
        got = _run_layer(_layer(emulated_cls, config, fp8_emulation=_emulation(recipe)), w, x, dy)
    assert stats.total == 3
    _assert_equal(got, want, f"{kind} {recipe}")
    assert want[0].abs().max() > 100  # many products really summed


def test_recipes_round_real_data_differently():
    exact = torch.nn.functional.linear(
        _skewed((SEQ, BATCH, IN), 3).double(), (_skewed((OUT, IN), 4) * 1e-2).double()
    )
    outputs = {}
    for recipe in RECIPES:
        y = _emulation(recipe).linear(_skewed((SEQ, BATCH, IN), 3), _skewed((OUT, IN), 4) * 1e-2)
        outputs[recipe] = y.double()
        rel = ((outputs[recipe] - exact).norm() / exact.norm()).item()
        # Each E4M3 operand is off by at most 2^-4 relative; a non-zero error proves rounding.
        assert 1e-4 < rel < 0.1, (recipe, rel)
    assert not torch.equal(outputs["blockwise"], outputs["tensorwise"])
    assert not torch.equal(outputs["blockwise"], outputs["mxfp8"])


def test_tensorwise_uses_one_exact_scale_per_tensor():
    """Float8CurrentScaling: scale = fp8_max / amax, not rounded; E5M2 gradients."""
    from ling_pretrain.fp8.emulation import TensorwiseEmulation

    def reference(t: torch.Tensor, fp8_max: float, dtype: torch.dtype) -> torch.Tensor:
        scale = torch.tensor(fp8_max) / t.abs().max()
        return (t * scale).clamp(-fp8_max, fp8_max).to(dtype).float() * (1.0 / scale)

    x, w, dy = _skewed((64, 256), 5), _skewed((96, 256), 6), _skewed((64, 96), 7)
    xq = reference(x, 448.0, torch.float8_e4m3fn)
    wq = reference(w, 448.0, torch.float8_e4m3fn)
    dyq = reference(dy, 57344.0, torch.float8_e5m2)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = TensorwiseEmulation().linear(xr, wr)
    y.backward(dy)
    _assert_close(y, xq @ wq.t())
    _assert_close(xr.grad, dyq @ wq)
    _assert_close(wr.grad, dyq.t() @ xq)
    assert not torch.allclose(xr.grad, reference(dy, 448.0, torch.float8_e4m3fn) @ wq, rtol=1e-6)


def _mx_reference(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """MXFP8 by definition, in float64: scale 2^ceil(log2(amax / 448)) per 1 x 32 tile."""
    rows, cols = x.shape
    tiles = x.double().reshape(rows, cols // block, block)
    amax = tiles.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / 448.0))), 1.0)
    q = (tiles / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
    return (q * scale).float().reshape(rows, cols)


def test_mxfp8_scales_are_e8m0_rounded_up():
    from ling_pretrain.fp8.emulation import mx_fake_quantize

    x = _skewed((48, 256), seed=8)
    assert torch.equal(mx_fake_quantize(x), _mx_reference(x))
    # amax exactly 448 keeps scale 1 (no round-up), so 2^-9, the smallest E4M3 subnormal,
    # survives; amax 449 needs scale 2, where 2^-9 / 2 rounds to zero.
    t = torch.zeros(2, 32)
    t[:, 1] = 2.0**-9
    t[0, 0], t[1, 0] = 448.0, 449.0
    q = mx_fake_quantize(t)
    assert q[0, 0] == 448.0 and q[0, 1] == 2.0**-9
    assert q[1, 0] == 448.0 and q[1, 1] == 0.0
    # Every 1 x 32 tile has its own scale: a huge value flushes its own tile only.
    u = torch.full((1, 64), 1e-3)
    u[0, 0] = 1e6
    qu = mx_fake_quantize(u)
    assert qu[0, 1] == 0.0 and bool(qu[0, 32:].ne(0).all())


def test_mxfp8_gemms_tile_along_their_own_reduction_dims():
    """dgrad re-quantises the weight column-wise; wgrad tiles dy and x along tokens."""
    from ling_pretrain.fp8.emulation import MXFP8Emulation, mx_fake_quantize

    x, w, dy = _skewed((96, 64), 9), _skewed((128, 64), 10), _skewed((96, 128), 11)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = MXFP8Emulation().linear(xr, wr)
    y.backward(dy)
    _assert_close(y, mx_fake_quantize(x) @ mx_fake_quantize(w).t())
    _assert_close(xr.grad, mx_fake_quantize(dy) @ mx_fake_quantize(w.t().contiguous()).t())
    _assert_close(
        wr.grad, mx_fake_quantize(dy.t().contiguous()) @ mx_fake_quantize(x.t().contiguous()).t()
    )
    # Reusing the row-wise weight, as blockwise may, would give another dgrad.
    assert not torch.allclose(xr.grad, mx_fake_quantize(dy) @ mx_fake_quantize(w), rtol=1e-6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_expert_without_tokens_runs(recipe):
    """SequentialMLP calls every local expert, also one that received no tokens."""
    w = _skewed((OUT, IN), seed=12).requires_grad_()
    x = torch.zeros(0, IN, requires_grad=True)
    y = _emulation(recipe).linear(x, w)
    y.sum().backward()
    assert y.shape == (0, OUT) and x.grad.shape == (0, IN)
    assert w.grad is not None and not w.grad.any()


def test_config_maps_to_te_recipes():
    from ling_pretrain.fp8.emulation import BlockwiseEmulation, MXFP8Emulation, TensorwiseEmulation
    from ling_pretrain.fp8.megatron_linear import fp8_emulation_spec

    for recipe in ("blockwise", "blockwise_fp8_params"):
        assert _emulation(recipe) == BlockwiseEmulation(FP8EmulationSpec(), recipe)
        spec = fp8_emulation_spec(compose([*CONFIG, f"fp8.recipe={recipe}"]).fp8)
        assert (spec.activation_block, spec.weight_block, spec.grad_block) == (
            (1, 128),
            (128, 128),
            (1, 128),
        )
        assert (spec.fmt, spec.grad_fmt, spec.power_of_2_scales) == ("e4m3", "e4m3", True)
    assert _emulation("tensorwise") == TensorwiseEmulation(fmt="e4m3", grad_fmt="e5m2")
    assert _emulation("mxfp8") == MXFP8Emulation(block=32, fmt="e4m3")
    with pytest.raises(ValueError, match="not expressible as an FP8EmulationSpec"):
        fp8_emulation_spec(compose([*CONFIG, "fp8.recipe=mxfp8"]).fp8)
    with pytest.raises(ValueError, match="no FP8 GEMMs to emulate; emulated recipes"):
        _emulation("bf16")


def test_gradient_accumulation_fusion_is_refused(world_of_one):
    config = copy.copy(_megatron_config())
    config.gradient_accumulation_fusion = True
    for _, emulated_cls in _classes().values():
        with pytest.raises(ValueError, match="gradient_accumulation_fusion=True is not supported"):
            _layer(emulated_cls, config)


# ----------------------------------------------------------------------------------
# Spec conversion, inspected on a built ling_tiny: 4 decoder layers (dense layer 0, MoE
# layers 1-3 with 8 experts and a shared expert each) and one MoE MTP layer.


def _fp8_linears(prefix: str, moe: bool) -> set[str]:
    names = {f"{prefix}.self_attention.linear_qkv", f"{prefix}.self_attention.linear_proj"}
    for fc in ("linear_fc1", "linear_fc2"):
        if moe:
            names |= {f"{prefix}.mlp.experts.local_experts.{e}.{fc}" for e in range(8)}
            names.add(f"{prefix}.mlp.shared_experts.{fc}")
        else:
            names.add(f"{prefix}.mlp.{fc}")
    return names


@pytest.mark.parametrize(
    "overrides,bf16_layers,eh_proj_fp8,count",
    [
        ([], (), False, 4 + 3 * 20 + 20),
        (
            [
                "fp8.first_last_layers_bf16=true",
                "fp8.num_layers_at_start_in_bf16=1",
                "fp8.num_layers_at_end_in_bf16=1",
            ],
            (0, 3),
            False,
            2 * 20 + 20,
        ),
        (["fp8.mtp_projections_bf16=false"], (), True, 4 + 3 * 20 + 20 + 1),
    ],
    ids=["all_fp8", "first_last_bf16", "mtp_eh_proj_fp8"],
)
def test_model_emulates_exactly_the_fp8_linears(
    world_of_one, overrides, bf16_layers, eh_proj_fp8, count
):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from ling_pretrain.models.build import build_model

    cfg = compose(
        [*CONFIG, "trainer.params_dtype=fp32", "fp8.recipe=blockwise", "fp8.emulate=true"]
        + overrides
    )
    (model,) = build_model(cfg)
    # megatron-core 0.19 renamed the MTP layer's transformer_layer to mtp_model_layer.
    mtp_layer = (
        "transformer_layer"
        if hasattr(model.mtp.layers[0], "transformer_layer")
        else "mtp_model_layer"
    )
    expected = _fp8_linears(f"mtp.layers.0.{mtp_layer}", moe=True)
    for i in set(range(4)) - set(bf16_layers):
        expected |= _fp8_linears(f"decoder.layers.{i}", moe=i > 0)
    if eh_proj_fp8:
        expected.add("mtp.layers.0.eh_proj")
    assert len(expected) == count

    column, row = _classes()["column"][1], _classes()["row"][1]
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        plain = (
            ColumnParallelLinear if isinstance(module, ColumnParallelLinear) else RowParallelLinear
        )
        emulated = column if plain is ColumnParallelLinear else row
        assert type(module) is (emulated if name in expected else plain), name
        expected.discard(name)
    assert not expected, f"not built at all: {sorted(expected)}"
    assert type(modules["output_layer"]) is ColumnParallelLinear
    assert type(modules["decoder.layers.1.mlp.router"]).__name__ == "TopKRouter"
    assert type(modules["embedding.word_embeddings"]).__name__ == "VocabParallelEmbedding"

    # One training step runs the three GEMMs of every emulated layer, and no others.
    tokens = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    with fp8_emulation_stats() as stats:
        model(tokens, torch.arange(32).expand(2, 32), None, labels=tokens).sum().backward()
    assert stats.forward == stats.dgrad == stats.wgrad == count


def test_spec_conversion_copies_shared_specs_and_passes_the_recipe(world_of_one):
    """megatron shares one spec object between layers: converting some must not convert all."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from ling_pretrain.fp8.emulation import TensorwiseEmulation
    from ling_pretrain.fp8.megatron_linear import emulated_fp8_layer_specs
    from ling_pretrain.models.build import build_layer_specs

    fp8 = compose(
        [
            *CONFIG,
            "fp8.recipe=tensorwise",
            "fp8.first_last_layers_bf16=true",
            "fp8.num_layers_at_end_in_bf16=1",
        ]
    ).fp8
    config = _megatron_config()
    block, mtp = build_layer_specs(config, use_te=False)
    assert block.layer_specs[2] is block.layer_specs[3]
    # megatron-core 0.19 renamed the MTP layer's transformer_layer to mtp_model_layer.
    slot = (
        "transformer_layer"
        if hasattr(mtp.layer_specs[0].submodules, "transformer_layer")
        else "mtp_model_layer"
    )
    assert getattr(mtp.layer_specs[0].submodules, slot) is block.layer_specs[3]
    new_block, new_mtp = emulated_fp8_layer_specs(block, mtp, config, fp8)

    def qkv(layer_spec):
        return layer_spec.submodules.self_attention.submodules.linear_qkv

    assert all(qkv(s) is ColumnParallelLinear for s in block.layer_specs)  # inputs untouched
    assert new_block.layer_specs[3] is block.layer_specs[3]  # kept in BF16
    for i in range(3):
        assert qkv(new_block.layer_specs[i]).params["fp8_emulation"] == TensorwiseEmulation()
    # The MTP layer copies the last decoder layer's spec but runs in FP8 regardless.
    mtp_layer = new_mtp.layer_specs[0].submodules
    assert qkv(getattr(mtp_layer, slot)).module is _classes()["column"][1]
    assert mtp_layer.eh_proj is ColumnParallelLinear


def test_spec_conversion_refuses_non_local_linears(world_of_one):
    from ling_pretrain.fp8.megatron_linear import emulated_fp8_layer_specs
    from ling_pretrain.models.build import build_layer_specs

    class TELayerNormColumnParallelLinear(torch.nn.Module):
        pass

    config = _megatron_config()
    block, mtp = build_layer_specs(config, use_te=False)
    layer = copy.deepcopy(block.layer_specs[0])
    layer.submodules.self_attention.submodules.linear_qkv = TELayerNormColumnParallelLinear
    block = dataclasses.replace(block, layer_specs=[layer, *block.layer_specs[1:]])
    fp8 = compose([*CONFIG, "fp8.recipe=blockwise"]).fp8
    with pytest.raises(ValueError, match="layer 0.self_attention.linear_qkv is TELayerNormColumn"):
        emulated_fp8_layer_specs(block, mtp, config, fp8)


# ----------------------------------------------------------------------------------
# Two processes.


@pytest.mark.distributed
def test_tensor_parallel_communication_is_megatrons():
    """TP2 with and without sequence parallelism, in two gloo processes (see _worker)."""
    from tests.fp8.torchrun_worker import run_worker

    stdout = run_worker(__file__)
    for layout in ("tp2", "tp2_sp"):
        for kind in ("column", "row"):
            assert f"ok {layout} {kind}" in stdout, stdout


@pytest.mark.distributed
def test_tp2_sp_first_step_loss_matches_one_process(tmp_path, seed_checkpoint):
    """TP2 + SP under emulation gives the single-process first-step loss, to 1e-5.

    Exact equality is not expected: tensor parallelism changes the contents of some
    quantisation tiles. A row-parallel input is split along the reduction dim, so the
    attention projection's 1 x 128 input tiles become two 1 x 64 tiles (the shared
    expert's fc2 input tiles 1 x 32 instead of 1 x 64), and the shared expert's weight
    shards regroup the rows/columns that make up a 128 x 128 block. With power-of-2
    scales an element rounds to the same FP8 value under any scale unless it lies in the
    subnormal range of one of the two tilings, i.e. below about 2^-15 of its tile's
    amax, and then moves by at most half a subnormal step: far below the fp32 rounding of
    the loss. So the first-step loss agrees to the 1e-5 the unquantised layouts meet
    (tests/train/test_layouts.py; measured here: ~2e-7), while emulation moves the
    loss by ~3e-4 (asserted, so a side that silently ran unquantised would fail).
    """
    from tests.conftest import TINY, read_metrics, run_pretrain

    common = [
        *TINY,
        "trainer.max_steps=1",
        f"checkpoint.init_from={seed_checkpoint}",
        "checkpoint.save_at_end=false",
    ]
    tp2_sp = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
    runs = {}
    for name, extra, nproc in (
        ("single", ["fp8=blockwise", "fp8.emulate=true"], 1),
        ("tp2_sp", ["fp8=blockwise", "fp8.emulate=true", *tp2_sp], 2),
        ("single_bf16", ["fp8=bf16"], 1),
    ):
        run_pretrain(tmp_path / name, [*common, *extra], nproc=nproc)
        runs[name] = read_metrics(tmp_path / name)[0]
    for key in ("loss", "mtp_loss"):
        assert runs["tp2_sp"][key] == pytest.approx(runs["single"][key], abs=1e-5), key
        assert abs(runs["single"][key] - runs["single_bf16"][key]) > 1e-4, key


def _worker() -> None:
    """Emulated vs megatron layers under TP2, with and without sequence parallelism.

    Every rank builds the same full tensors and takes its shard: column-parallel layers
    split the weight's rows (and, under SP, the input's sequence); row-parallel layers
    split the input's and the weight's columns (and, under SP, the output's sequence).
    """
    import torch.distributed as dist

    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    tp2 = "parallel.tensor_model_parallel_size=2"
    init_distributed(compose([*CONFIG, tp2, "parallel.sequence_parallel=true"]))
    try:
        rank = dist.get_rank()
        for layout, sp in (("tp2", False), ("tp2_sp", True)):
            config = _megatron_config(tp2, f"parallel.sequence_parallel={str(sp).lower()}")
            tokens = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2) if sp else slice(None)
            rows = slice(rank * OUT // 2, (rank + 1) * OUT // 2)
            cols = slice(rank * IN // 2, (rank + 1) * IN // 2)
            for kind, (megatron_cls, emulated_cls) in _classes().items():
                x, w = _fp8_exact((SEQ, BATCH, IN), 0), _fp8_exact((OUT, IN), 1)
                dy = _fp8_exact((SEQ, BATCH, OUT), 2)
                if kind == "column":
                    x, w, dy = x[tokens], w[rows], dy[..., rows]
                else:
                    x, w, dy = x[..., cols], w[:, cols], dy[tokens]
                x, dy = x.contiguous(), dy.contiguous()
                want = _run_layer(_layer(megatron_cls, config), w, x, dy)
                for recipe in RECIPES:
                    layer = _layer(emulated_cls, config, fp8_emulation=_emulation(recipe))
                    _assert_equal(_run_layer(layer, w, x, dy), want, f"{layout} {kind} {recipe}")

                # Real data: the output is emulated_linear of what each GEMM reads.
                xs, ws = _skewed((SEQ, BATCH, IN), 3), _skewed((OUT, IN), 4) * 1e-2
                layer = _layer(emulated_cls, config)
                with torch.no_grad():
                    if kind == "column":
                        layer.weight.copy_(ws[rows])
                        y, _ = layer(xs[tokens].contiguous())
                        want_y = emulated_linear(xs, ws[rows])
                    else:
                        layer.weight.copy_(ws[:, cols])
                        y, _ = layer(xs[..., cols].contiguous())
                        halves = (slice(0, IN // 2), slice(IN // 2, IN))
                        partial = [emulated_linear(xs[..., h], ws[:, h]) for h in halves]
                        want_y = (partial[0] + partial[1])[tokens]
                assert torch.equal(y, want_y), f"{layout} {kind}: real-data forward differs"
                if rank == 0:
                    print(f"ok {layout} {kind}", flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    _worker()
