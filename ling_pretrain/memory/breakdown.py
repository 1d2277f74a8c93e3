"""Per-GPU memory of the model states of a run: what each FP8 feature costs or saves.

Why this module exists
----------------------
FP8 does not save memory by itself. Under an FP8 recipe megatron-core still keeps BF16
weights, FP32 gradients, FP32 master weights and FP32 Adam moments, and TransformerEngine
*adds* an FP8 copy of every weight it multiplies in FP8, cached from the first micro-batch of
a step until the weights change. On Hopper an FP8 GEMM only reads its operands in "TN"
layout, so for the backward pass TE also caches the weight's transpose (its column-wise FP8
copy). With the blockwise recipe the two copies together cost as much as the BF16 weight
again. Ling 2.0's memory work removes these costs one by one:

* **on-demand transpose** drops the cached column-wise copy and builds it inside the
  backward GEMM (lossless for 128 x 128 weight blocks, whose scale is the same read either
  way round). Released TE does this for blockwise FP8 primary weights only
  (:mod:`ling_pretrain.fp8.te_on_demand_transpose`); a config asking for it elsewhere is
  counted with the cached transpose unless the saving is asked for explicitly (Ling's
  patched TE);
* **FP8 primary weights** (megatron ``fp8_param``, our ``fp8.fp8_param_gather`` or recipe
  ``blockwise_fp8_params``) make the FP8 copy the model's weight, so the BF16 weight goes
  (the FP32 master copy in the optimizer stays);
* **8-bit Adam** (``optimizer=adam8bit``, :mod:`ling_pretrain.optim`; bitsandbytes' blockwise
  layout, Ling's "FP8 optimizer") stores each moment in
  one byte plus an fp32 absmax per 256 values instead of four bytes.

:func:`memory_breakdown` counts the bytes one GPU holds for these *model states* under a
config and a layout, tensor by tensor as megatron-core builds them, so each feature's
saving can be read off before renting GPUs (``launch/memory.py`` prints it).

Activations are left out on purpose. Their size depends on things a closed form cannot
know: how unevenly tokens reach the experts in a given step, the dispatcher's buffers
(DeepEP's are sized by environment variables), which kernels are fused, which modules are
recomputed and how many micro-batches the pipeline schedule keeps in flight. A number
pretending to cover them would be wrong in ways nobody could check; measure them with
``torch.cuda.max_memory_allocated`` on the real layout instead.

Assumptions
-----------
=============================  ===============================================================
item                           what is counted (bytes per local element unless stated)
=============================  ===============================================================
weights                        ``trainer.params_dtype`` (2 for bf16/fp16, 4 for fp32) for every
                               parameter; a weight kept as FP8 primary weight counts its 1-byte
                               row-wise data plus its row-wise ``scale_inv`` instead.
fp8_weights                    1 + row-wise ``scale_inv`` for each weight of an FP8 GEMM whose
                               primary weight is not FP8: TE's cached weight workspace
                               (megatron passes ``is_first_microbatch``, so TE keeps it).
fp8_transposes                 1 + column-wise ``scale_inv`` for each weight of an FP8 GEMM,
                               unless on-demand transpose is on.
main_grads                     4 for every parameter: megatron DDP's gradient buffer with
                               ``grad_reduce_in_fp32=True`` (what our mcore config sets). The
                               buffer is full size on every rank (ZeRO-1 shards only states).
master_weights                 4 / shard, for every parameter whose storage is not fp32 (all of
                               them under bf16/fp16; only FP8 primary weights under fp32).
optimizer_states               per shard element: 8 for Adam (two fp32 moments); 4 for Adam
                               with bf16 moments (megatron's precision-aware optimizer);
                               8-bit Adam: 2 + 2 x 4 bytes of fp32 absmax per 256-value block,
                               and 8 for shards of fewer than 4096 elements (bitsandbytes'
                               ``min_8bit_size``; 256-entry code tables are shared, not counted).
shard                          the distributed optimizer's group: DP x CP ranks for non-expert
                               parameters, expert DP = world / (EP x ETP x PP) for routed
                               experts; 1 when ``parallel.use_distributed_optimizer`` is off.
                               Each tensor's shard is ``ceil(numel / shard)`` elements, i.e. the
                               average rank's share (megatron cuts one flat buffer into equal
                               ranges, so a small tensor may sit whole on one rank).
scale_inv (blockwise)          fp32 per 128 x 128 block; row-wise
                               ``ceil(M/128) x roundup4(ceil(K/128))``, column-wise
                               ``ceil(K/128) x roundup4(ceil(M/128))`` (TE pads the inner dim to
                               4) for an ``[M, K]`` weight.
scale_inv (mxfp8)              1-byte E8M0 per 32 values: row-wise
                               ``roundup(M, 128) x roundup4(K/32)``, column-wise
                               ``roundup4(M/32) x roundup(K, 128)``. The column-wise copy is
                               quantised separately, not transposed, so on-demand transpose
                               does not apply.
scale_inv (tensorwise)         one fp32 scale per tensor, shared by data and transpose.
FP8 GEMM weights               attention ``linear_qkv`` and ``linear_proj``, dense MLP and shared
                               expert ``fc1``/``fc2``, routed experts (one tensor per local
                               expert, as TE's grouped linear holds them), the MTP layer's
                               attention and MoE; MTP ``eh_proj`` only when
                               ``fp8.mtp_projections_bf16`` is false. Layers kept in BF16 by
                               ``fp8.first_last_layers_bf16`` are not FP8.
never FP8                      embedding, lm_head (megatron's own linear, not TE), router,
                               every norm (including those fused into TE's LayerNormLinear).
tensor parallel                column-parallel weights (``linear_qkv``, ``fc1``, MTP
                               ``eh_proj``, embedding and lm_head by vocabulary rows) split their
                               rows by TP, row-parallel ones (``linear_proj``, ``fc2``) their
                               columns; norms and the router are replicated on every TP rank.
                               Routed experts split by ETP the same way, and E / EP experts are
                               local.
pipeline parallel              layers split evenly in order (with VPP, chunk ``c`` on rank
                               ``c % PP``); embedding on the first rank, final norm and lm_head
                               on the last; the MTP layers on the last rank, which then also
                               holds its own copy of the embedding (megatron-core builds one
                               for MTP when PP > 1). The breakdown reports the rank with the
                               largest total and lists every rank's total.
not counted                    activations (see above); the fp32 expert bias and other buffers
                               (kilobytes); temporary buffers (all-gather/reduce-scatter
                               buckets, the transpose built on demand, optimizer-step
                               temporaries); CUDA context, NCCL and cuBLAS workspaces and
                               allocator fragmentation (together often 2-5 GiB per GPU).
``fp8.emulate``                ignored: the breakdown describes the TransformerEngine run of
                               the recipe (emulation keeps no FP8 copies).
=============================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ling_pretrain.core.dtypes import PARAMS_DTYPES
from ling_pretrain.core.layout import Layout, derive_layout, has_experts
from ling_pretrain.core.recipes import RECIPES, get_recipe
from ling_pretrain.models.registry import get_family

__all__ = [
    "CLASSES",
    "ITEMS",
    "OPTIMIZERS",
    "LadderStep",
    "MemoryBreakdown",
    "MemorySettings",
    "StateBytes",
    "fp8_feature_ladder",
    "memory_breakdown",
]

OPTIMIZERS = ("adam", "adam8bit", "adam_bf16_moments")
"""Optimizer kinds the model knows: fp32 Adam moments, 8-bit blockwise moments (``adam8bit``),
bf16 moments (megatron's precision-aware optimizer)."""

ITEMS = (
    "weights",
    "fp8_weights",
    "fp8_transposes",
    "main_grads",
    "master_weights",
    "optimizer_states",
)
"""The items of a breakdown, in the order they are printed."""

CLASSES = ("routed_experts", "non_expert_gemm", "non_expert_other")
"""Parameter classes: routed-expert weights (split by EP, optimizer sharded over expert DP);
non-expert weights of the GEMMs that run in FP8 under an FP8 recipe (attention, dense MLP,
shared expert, MTP layer); every other parameter (embedding, lm_head, router, norms, and
weights kept in BF16 by ``fp8.first_last_layers_bf16`` or ``fp8.mtp_projections_bf16``)."""

BNB_BLOCK = 256
"""Values per fp32 absmax of the 8-bit optimizer states (``ling_pretrain.optim.quant.BLOCK``,
as in bitsandbytes; a test keeps the two equal without this module importing torch)."""
BNB_MIN_8BIT_SIZE = 4096
"""Tensors with fewer elements keep 32-bit optimizer states
(``ling_pretrain.optim.adam8bit.MIN_8BIT_NUMEL``, bitsandbytes' ``min_8bit_size``)."""
FP8_BLOCK = 128
"""Side of TE's square weight blocks in the blockwise recipe."""
MX_BLOCK = 32
"""Values per E8M0 scale in MXFP8."""


@dataclass(frozen=True, kw_only=True)
class StateBytes:
    """Bytes of each model-state item on one GPU (or of one parameter class on it)."""

    weights: int = 0
    """Model weights as stored: params_dtype, or FP8 data + row-wise scales for FP8 primary
    weights."""
    fp8_weights: int = 0
    """TE's cached row-wise FP8 copy (+ scales) of weights that are not FP8 themselves."""
    fp8_transposes: int = 0
    """TE's cached column-wise (transposed) FP8 copy (+ scales)."""
    main_grads: int = 0
    """fp32 gradient buffer of megatron's DDP (full size on every rank)."""
    master_weights: int = 0
    """fp32 master weights, this rank's shard."""
    optimizer_states: int = 0
    """Adam's two moments (and 8-bit absmax), this rank's shard."""

    @property
    def total(self) -> int:
        """Sum of all items, in bytes."""
        return sum(getattr(self, name) for name in ITEMS)

    def __add__(self, other: StateBytes) -> StateBytes:
        return StateBytes(**{n: getattr(self, n) + getattr(other, n) for n in ITEMS})

    def as_dict(self) -> dict[str, int]:
        """Items and total as a plain dict of bytes."""
        return {**{n: getattr(self, n) for n in ITEMS}, "total": self.total}


@dataclass(frozen=True, kw_only=True)
class MemorySettings:
    """The memory-relevant choices a breakdown was computed for."""

    params_dtype: str
    recipe: str
    fp8_primary_weights: bool
    on_demand_transpose: bool
    optimizer: str
    use_distributed_optimizer: bool


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Model-state memory of one GPU: the pipeline rank with the largest total."""

    states: StateBytes
    """Per-item bytes of the reported pipeline rank."""
    by_class: dict[str, StateBytes]
    """The same split by parameter class (keys: :data:`CLASSES`)."""
    local_params: dict[str, int]
    """Number of parameters of each class on the reported rank."""
    pipeline_rank: int
    """The pipeline rank reported (the one with the largest total)."""
    stage_totals: tuple[int, ...]
    """Total bytes of every pipeline rank, rank 0 first."""
    layout: Layout
    settings: MemorySettings

    @property
    def total(self) -> int:
        """Total bytes of the reported rank."""
        return self.states.total

    def as_dict(self) -> dict[str, Any]:
        """Plain containers (bytes), for JSON."""
        return {
            "bytes": self.states.as_dict(),
            "by_class": {k: v.as_dict() for k, v in self.by_class.items()},
            "local_params": dict(self.local_params),
            "pipeline_rank": self.pipeline_rank,
            "stage_totals": list(self.stage_totals),
            "layout": asdict(self.layout),
            "settings": asdict(self.settings),
        }


@dataclass(frozen=True)
class _Tensor:
    """``count`` identical local tensors of shape ``[rows, cols]`` (``cols=1`` for vectors)."""

    rows: int
    cols: int
    count: int = 1
    expert: bool = False
    """A routed expert's weight (split by EP, optimizer sharded over expert DP)."""
    gemm: bool = False
    """The weight of a GEMM that runs in FP8 whenever an FP8 recipe is on."""

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def cls(self) -> str:
        if self.expert:
            return "routed_experts"
        return "non_expert_gemm" if self.gemm else "non_expert_other"


def _div(n: int, parts: int) -> int:
    return -(-n // parts)


def _round_up(n: int, multiple: int) -> int:
    return _div(n, multiple) * multiple


def _scale_bytes(recipe: str, rows: int, cols: int) -> tuple[int, int]:
    """(row-wise, column-wise) ``scale_inv`` bytes of one ``[rows, cols]`` FP8 weight."""
    scaling = get_recipe(recipe).scaling
    if scaling == "blockwise":
        row = _div(rows, FP8_BLOCK) * _round_up(_div(cols, FP8_BLOCK), 4)
        col = _div(cols, FP8_BLOCK) * _round_up(_div(rows, FP8_BLOCK), 4)
        return 4 * row, 4 * col
    if scaling == "mxfp8":
        row = _round_up(rows, 128) * _round_up(_div(cols, MX_BLOCK), 4)
        col = _round_up(_div(rows, MX_BLOCK), 4) * _round_up(cols, 128)
        return row, col
    if scaling == "tensorwise":
        return 4, 0
    raise AssertionError(recipe)


def _swiglu(
    hidden: int, ffn: int, tp: int, count: int, expert: bool, gemm: bool
) -> Iterator[_Tensor]:
    yield _Tensor(_div(2 * ffn, tp), hidden, count, expert, gemm)  # fc1 = [gate; up]
    yield _Tensor(hidden, _div(ffn, tp), count, expert, gemm)  # fc2


def _layer(m: Any, layout: Layout, dense: bool, gemm: bool) -> Iterator[_Tensor]:
    """Tensors of one decoder (or MTP) transformer layer on one rank."""
    tp = layout.tp
    heads = m.num_attention_heads * m.kv_channels
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    yield _Tensor(m.hidden_size, 1)  # input norm (fused into linear_qkv by TE)
    yield _Tensor(_div(qkv_rows, tp), m.hidden_size, gemm=gemm)  # linear_qkv
    if m.qk_layernorm:
        yield _Tensor(m.kv_channels, 1, count=2)  # q and k layernorm
    yield _Tensor(m.hidden_size, _div(heads, tp), gemm=gemm)  # linear_proj
    yield _Tensor(m.hidden_size, 1)  # pre-MLP norm
    if dense:
        yield from _swiglu(m.hidden_size, m.ffn_hidden_size, tp, 1, False, gemm)
        return
    yield _Tensor(m.num_moe_experts, m.hidden_size)  # router, replicated over TP
    if m.moe_shared_expert_intermediate_size:
        yield from _swiglu(m.hidden_size, m.moe_shared_expert_intermediate_size, tp, 1, False, gemm)
    local_experts = m.num_moe_experts // layout.ep
    yield from _swiglu(m.hidden_size, m.moe_ffn_hidden_size, layout.etp, local_experts, True, gemm)


def _stage_tensors(cfg: Any, layout: Layout, rank: int) -> list[_Tensor]:
    """Every parameter tensor pipeline rank ``rank`` holds (the same on all its TP/EP peers)."""
    m, f = cfg.model, cfg.fp8
    pp, chunks = layout.pp, layout.pp * (layout.vpp or 1)
    per_chunk = _div(m.num_layers, chunks)
    first, last = rank == 0, rank == pp - 1
    bf16_start = f.num_layers_at_start_in_bf16 if f.first_last_layers_bf16 else 0
    bf16_end = f.num_layers_at_end_in_bf16 if f.first_last_layers_bf16 else 0
    embedding = _Tensor(_div(m.vocab_size, layout.tp), m.hidden_size)  # vocab-parallel rows

    moe = get_family(m).moe_layer_pattern(m)
    tensors: list[_Tensor] = []
    if first or (last and m.mtp_num_layers):
        tensors.append(embedding)
    for i in range(m.num_layers):
        if (i // per_chunk) % pp != rank:
            continue
        gemm = bf16_start <= i < m.num_layers - bf16_end
        tensors.extend(_layer(m, layout, dense=not moe[i], gemm=gemm))
    if last:
        tensors.append(_Tensor(m.hidden_size, 1))  # final norm
        tensors.append(embedding)  # lm_head: untied, same shape
        for _ in range(m.mtp_num_layers):
            tensors.append(_Tensor(m.hidden_size, 1, count=2))  # enorm, hnorm
            eh_gemm = not f.mtp_projections_bf16
            tensors.append(_Tensor(_div(m.hidden_size, layout.tp), 2 * m.hidden_size, gemm=eh_gemm))
            tensors.extend(_layer(m, layout, dense=not moe[-1], gemm=True))
            tensors.append(_Tensor(m.hidden_size, 1))  # MTP final norm
    return tensors


def _adam_state_bytes(optimizer: str, shard_numel: int) -> int:
    if optimizer == "adam":
        return 8 * shard_numel
    if optimizer == "adam_bf16_moments":
        return 4 * shard_numel
    if shard_numel < BNB_MIN_8BIT_SIZE:
        return 8 * shard_numel
    return 2 * shard_numel + 2 * 4 * _div(shard_numel, BNB_BLOCK)


def _tensor_bytes(t: _Tensor, settings: MemorySettings, shard: int) -> StateBytes:
    param_bytes = PARAMS_DTYPES[settings.params_dtype]
    n = t.numel
    weights = fp8_weights = fp8_transposes = 0
    fp8 = t.gemm and settings.recipe != "bf16"
    fp8_primary = fp8 and settings.fp8_primary_weights
    if fp8:
        row_scale, col_scale = _scale_bytes(settings.recipe, t.rows, t.cols)
        if fp8_primary:
            weights = n + row_scale
        else:
            weights = n * param_bytes
            fp8_weights = n + row_scale
        if not settings.on_demand_transpose:
            fp8_transposes = n + col_scale
    else:
        weights = n * param_bytes
    shard_numel = _div(n, shard)
    has_master = fp8_primary or param_bytes != 4
    return StateBytes(
        weights=t.count * weights,
        fp8_weights=t.count * fp8_weights,
        fp8_transposes=t.count * fp8_transposes,
        main_grads=t.count * 4 * n,
        master_weights=t.count * 4 * shard_numel if has_master else 0,
        optimizer_states=t.count * _adam_state_bytes(settings.optimizer, shard_numel),
    )


def _check(cfg: Any, world_size: int, settings: MemorySettings) -> None:
    p, m = cfg.parallel, cfg.model
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    problems = []
    if min(tp, pp, cp, ep, etp) < 1:
        problems.append("parallel sizes must be >= 1")
    elif world_size % (tp * pp * cp):
        problems.append(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size x "
            f"pipeline_model_parallel_size x context_parallel_size = {tp * pp * cp}"
        )
    elif world_size % (ep * etp * pp):
        problems.append(
            f"world size {world_size} is not a multiple of expert_model_parallel_size x "
            f"expert_tensor_parallel_size x pipeline_model_parallel_size = {ep * etp * pp}"
        )
    if ep >= 1 and has_experts(m) and m.num_moe_experts % ep:
        problems.append(
            f"expert_model_parallel_size={ep} does not divide model.num_moe_experts="
            f"{m.num_moe_experts}"
        )
    chunks = pp * (p.virtual_pipeline_model_parallel_size or 1)
    if chunks >= 1 and m.num_layers % chunks:
        problems.append(
            f"model.num_layers={m.num_layers} is not divisible by the {chunks} pipeline chunks"
        )
    if settings.params_dtype not in PARAMS_DTYPES:
        problems.append(
            f"trainer.params_dtype={settings.params_dtype!r} is not one of fp32, bf16, fp16"
        )
    if settings.recipe not in RECIPES:
        problems.append(f"fp8 recipe {settings.recipe!r} is not one of {', '.join(RECIPES)}")
    if settings.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer {settings.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if settings.fp8_primary_weights and settings.recipe == "bf16":
        problems.append("FP8 primary weights need an FP8 recipe (fp8.recipe is bf16)")
    if (
        settings.on_demand_transpose
        and settings.recipe in RECIPES
        and RECIPES[settings.recipe].scaling not in ("blockwise", "tensorwise")
    ):
        problems.append(
            f"on-demand transpose needs an FP8 recipe whose column-wise copy is the transpose of "
            f"the row-wise one (blockwise, tensorwise); fp8.recipe is {settings.recipe}"
        )
    if problems:
        raise ValueError("cannot compute the memory breakdown: " + "; ".join(problems) + ".")


def te_can_transpose_on_demand(recipe: str, fp8_primary_weights: bool) -> bool:
    """Whether released TransformerEngine can run on-demand transpose for these settings.

    Only 2D (128x128) block-scaled FP8 primary weights rebuild their column-wise copy from the
    row-wise one (``ling_pretrain.fp8.te_on_demand_transpose``); with BF16 primary weights TE
    quantises a cached FP8 workspace, and per-tensor scaled weights keep a cached transpose.
    """
    return get_recipe(recipe).weight_blocks_square and bool(fp8_primary_weights)


def memory_breakdown(
    cfg: Any,
    world_size: int,
    *,
    recipe: str | None = None,
    fp8_primary_weights: bool | None = None,
    on_demand_transpose: bool | None = None,
    optimizer: str | None = None,
) -> MemoryBreakdown:
    """Bytes of model states one GPU holds for ``cfg`` on ``world_size`` GPUs.

    Model states are weights, TE's FP8 weight copies, gradients, master weights and
    optimizer states; activations are not included (see the module docstring, which also
    tabulates every assumption). The figures are for the pipeline rank with the largest total.

    Args:
        cfg: a composed job config (``JobConfig`` structure).
        world_size: number of GPUs (training processes).
        recipe: FP8 recipe; defaults to ``cfg.fp8.recipe``.
        fp8_primary_weights: keep weights of FP8 GEMMs as FP8 (megatron ``fp8_param``);
            defaults to ``cfg.fp8.fp8_param_gather`` or recipe ``blockwise_fp8_params``
            (and to False under ``bf16``).
        on_demand_transpose: do not cache the transposed FP8 weight. Defaults to
            ``cfg.fp8.on_demand_transpose`` where released TransformerEngine can do it
            (:func:`te_can_transpose_on_demand`: blockwise recipe with FP8 primary weights),
            else False (the cached transpose such a run really holds). Passing True counts
            the saving for any recipe whose column-wise copy is a transpose (Ling's TE patch).
        optimizer: ``adam``, ``adam8bit`` or ``adam_bf16_moments``; defaults to
            ``cfg.optimizer.optimizer``.

    Returns:
        The breakdown of the largest pipeline rank, with per-class detail.

    Raises:
        ValueError: the layout does not fit the world size or the model, or the settings
            contradict each other (e.g. FP8 primary weights without an FP8 recipe).
    """
    recipe = cfg.fp8.recipe if recipe is None else recipe
    if fp8_primary_weights is None:
        entry = get_recipe(recipe)
        fp8_primary_weights = entry.is_fp8 and (
            cfg.fp8.fp8_param_gather or entry.fp8_primary_weights
        )
    if on_demand_transpose is None:
        on_demand_transpose = bool(getattr(cfg.fp8, "on_demand_transpose", False))
        if on_demand_transpose and not te_can_transpose_on_demand(recipe, fp8_primary_weights):
            # A config asking for it on a recipe released TE cannot do it for: count the
            # cached transpose that the run will really hold.
            on_demand_transpose = False
    settings = MemorySettings(
        params_dtype=cfg.trainer.params_dtype,
        recipe=recipe,
        fp8_primary_weights=bool(fp8_primary_weights),
        on_demand_transpose=on_demand_transpose,
        optimizer=cfg.optimizer.optimizer if optimizer is None else optimizer,
        use_distributed_optimizer=bool(cfg.parallel.use_distributed_optimizer),
    )
    _check(cfg, world_size, settings)
    layout = derive_layout(cfg, world_size)
    distributed = settings.use_distributed_optimizer
    shards = {
        "routed_experts": layout.expert_dp if distributed else 1,
        "non_expert_gemm": layout.dp * layout.cp if distributed else 1,
        "non_expert_other": layout.dp * layout.cp if distributed else 1,
    }

    stages = []
    for rank in range(layout.pp):
        by_class = {c: StateBytes() for c in CLASSES}
        params = dict.fromkeys(CLASSES, 0)
        for t in _stage_tensors(cfg, layout, rank):
            by_class[t.cls] = by_class[t.cls] + _tensor_bytes(t, settings, shards[t.cls])
            params[t.cls] += t.count * t.numel
        stages.append((by_class, params))

    totals = tuple(sum(b.total for b in by_class.values()) for by_class, _ in stages)
    worst = max(range(layout.pp), key=lambda r: (totals[r], r))
    by_class, params = stages[worst]
    states = StateBytes()
    for c in CLASSES:
        states = states + by_class[c]
    return MemoryBreakdown(
        states=states,
        by_class=by_class,
        local_params=params,
        pipeline_rank=worst,
        stage_totals=totals,
        layout=layout,
        settings=settings,
    )


@dataclass(frozen=True)
class LadderStep:
    """One row of :func:`fp8_feature_ladder`."""

    label: str
    breakdown: MemoryBreakdown
    saving: int = 0
    """Bytes this step saves against the previous one (negative when it costs memory)."""


def fp8_feature_ladder(cfg: Any, world_size: int, recipe: str | None = None) -> list[LadderStep]:
    """The breakdown with Ling's FP8 memory features switched on one after another.

    Steps: no FP8 -> FP8 GEMMs (TE caches the FP8 weight and its transpose) -> on-demand
    transpose -> FP8 primary weights -> 8-bit Adam. The on-demand step is skipped for MXFP8,
    whose column-wise copy is not a transpose.

    Args:
        cfg: a composed job config. Its model, layout, params_dtype and choice of layers
            kept in BF16 are used; its recipe, primary-weight and optimizer settings are not.
        world_size: number of GPUs.
        recipe: FP8 recipe of the FP8 steps; defaults to ``cfg.fp8.recipe``, or ``blockwise``
            (Ling's) when that is ``bf16``.

    Returns:
        One :class:`LadderStep` per step, the baseline first.
    """
    if recipe is None:
        recipe = "blockwise" if not get_recipe(cfg.fp8.recipe).is_fp8 else cfg.fp8.recipe
    entry = get_recipe(recipe)
    if not entry.is_fp8:
        raise ValueError("the FP8 feature ladder needs an FP8 recipe, not bf16.")
    if entry.fp8_primary_weights:
        # The ladder switches FP8 primary weights on itself: start from the plain recipe.
        recipe = next(
            r.name
            for r in RECIPES.values()
            if r.megatron_recipe == entry.megatron_recipe and not r.fp8_primary_weights
        )
    # MXFP8 quantises its column-wise copy separately, so it is no transpose to drop.
    odt = entry.scaling != "mxfp8"
    dtype = cfg.trainer.params_dtype
    steps: list[tuple[str, dict[str, Any]]] = [
        (f"{dtype} weights, no FP8", dict(recipe="bf16", optimizer="adam")),
        (
            f"+ FP8 GEMMs ({recipe}; TE caches FP8 weight + "
            f"{'transpose' if odt else 'column-wise copy'})",
            dict(recipe=recipe, fp8_primary_weights=False, optimizer="adam"),
        ),
    ]
    if odt:
        steps.append(
            (
                "+ on-demand transpose",
                dict(
                    recipe=recipe,
                    fp8_primary_weights=False,
                    on_demand_transpose=True,
                    optimizer="adam",
                ),
            )
        )
    steps.append(
        (
            "+ FP8 primary weights",
            dict(
                recipe=recipe, fp8_primary_weights=True, on_demand_transpose=odt, optimizer="adam"
            ),
        )
    )
    steps.append(
        (
            "+ 8-bit Adam states",
            dict(
                recipe=recipe,
                fp8_primary_weights=True,
                on_demand_transpose=odt,
                optimizer="adam8bit",
            ),
        )
    )
    ladder: list[LadderStep] = []
    previous = None
    for label, kwargs in steps:
        b = memory_breakdown(cfg, world_size, **kwargs)
        ladder.append(LadderStep(label, b, 0 if previous is None else previous - b.total))
        previous = b.total
    return ladder


GIB = 1024**3


def check_fits(
    cfg: Any, world_size: int, device: str, memory_bytes: int, errors: list[str]
) -> None:
    """Append a problem when the model states of one rank cannot fit in ``memory_bytes``.

    Model states only (activations come on top), so a layout refused here certainly cannot
    run. Under ``fp8.emulate`` no FP8 weight copies exist, so they are not counted.

    Args:
        cfg: the composed job config.
        world_size: training processes.
        device: ``cuda`` or ``cpu`` (for the message).
        memory_bytes: what one process may use (one GPU, or its share of host RAM).
        errors: where the problem goes.
    """
    recipe = "bf16" if cfg.fp8.emulate else None
    need = memory_breakdown(cfg, world_size, recipe=recipe).total
    if need > memory_bytes:
        where = "one GPU" if device == "cuda" else "the host RAM share of one process"
        errors.append(
            f"model {cfg.model.name} needs at least {need / GIB:.1f} GiB per process for "
            f"weights, gradients and optimizer states under this layout, but {where} has "
            f"{memory_bytes / GIB:.1f} GiB. Spread it over more GPUs (raise "
            "expert_model_parallel_size / pipeline_model_parallel_size / data parallelism "
            "with the distributed optimizer) or pick a smaller model (+model=ling_tiny on CPU). "
            "launch/memory.py prints the breakdown; run.check_memory=false skips this check."
        )
