"""Structured-config schemas: one keyword-only dataclass per Hydra config group.

Every YAML under ``conf/<group>/`` starts from the schema registered for its group (see
:mod:`ling_pretrain.config.store`), so a misspelt key or a wrong type fails when the config is
composed, naming the key. Each field's docstring is the configuration reference: the table in
``docs/configuration.md`` is generated from them.

Where a field passes straight through to megatron-core it carries megatron-core's name, so the
mappings (the model family's ``transformer_kwargs``, :mod:`ling_pretrain.models.mcore`,
:mod:`ling_pretrain.optim.mcore`, :mod:`ling_pretrain.train.ddp`) stay mechanical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass(kw_only=True)
class ModelConfig:
    """A model architecture of one family (``ling_pretrain/models/<family>/``). Presets live
    in ``conf/model/``. The mixture-of-experts fields are null for dense models, as in
    megatron-core; Ling 2.0 presets set them."""

    name: str = MISSING
    """Preset name, used in run names and logs (e.g. ``ling_mini``)."""
    family: str = "ling"
    """Model family: the package ``ling_pretrain/models/<family>/`` that builds, converts,
    counts and checks it (``ling``: Ling 2.0 / BailingMoeV2; ``llama``: Llama 3.x; ``qwen3``:
    dense Qwen3)."""
    num_layers: int = MISSING
    """Decoder layers, not counting MTP layers (HF ``num_hidden_layers``)."""
    hidden_size: int = MISSING
    """Model width (HF ``hidden_size``)."""
    num_attention_heads: int = MISSING
    """Query heads (HF ``num_attention_heads``)."""
    num_query_groups: int = MISSING
    """Key/value heads for grouped-query attention (HF ``num_key_value_heads``)."""
    kv_channels: int = 128
    """Per-head dimension (HF ``head_dim``)."""
    ffn_hidden_size: int = MISSING
    """Width of the dense SwiGLU MLP (in MoE models: of the first ``first_k_dense_replace``
    layers; HF ``intermediate_size``)."""
    first_k_dense_replace: int = 1
    """MoE models: number of leading layers that use a dense MLP instead of MoE (HF name)."""
    vocab_size: int = 157184
    """Vocabulary size of the embedding and output layer (HF ``vocab_size``)."""
    max_position_embeddings: int = 32768
    """Longest sequence the rotary tables are built for, in tokens."""
    rotary_percent: float = 0.5
    """Fraction of each head's channels that RoPE rotates (HF ``partial_rotary_factor``)."""
    rotary_base: int = 600000
    """RoPE theta (HF ``rope_theta``): 10000 for the 4K base checkpoints, 600000 for 32K ones."""
    rope_scaling: bool = False
    """Llama-3.1's RoPE frequency scaling (HF ``rope_scaling.rope_type: llama3``), as
    megatron-core's ``GPTModel`` applies it: frequencies whose wavelength exceeds 8192 tokens
    are divided by ``rope_scaling_factor``, those below 2048 tokens kept, and the band between
    interpolated (megatron-core fixes ``low_freq_factor`` 1, ``high_freq_factor`` 4 and
    ``original_max_position_embeddings`` 8192)."""
    rope_scaling_factor: float = 8.0
    """The divisor of the low RoPE frequencies under ``rope_scaling`` (HF
    ``rope_scaling.factor``; 8 for Llama-3.1)."""
    layernorm_epsilon: float = 1e-6
    """RMSNorm epsilon (HF ``rms_norm_eps``)."""
    qk_layernorm: bool = True
    """QK-norm: an RMSNorm over each query and key head before RoPE, one weight of size
    ``kv_channels`` shared by all heads (Ling 2.0 and Qwen3 have it, Llama does not)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of new weights."""
    num_moe_experts: int | None = None
    """Routed experts per MoE layer (HF ``num_experts``); null for a dense model."""
    moe_ffn_hidden_size: int | None = None
    """Width of each routed expert (HF ``moe_intermediate_size``); null for a dense model."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total width of the shared expert(s): ``num_shared_experts * moe_intermediate_size``
    (0: none); null for a dense model."""
    moe_router_topk: int = 8
    """Experts chosen per token (HF ``num_experts_per_tok``)."""
    moe_router_num_groups: int = 8
    """Expert groups for group-limited routing (HF ``n_group``)."""
    moe_router_group_topk: int = 4
    """Groups kept per token (HF ``topk_group``)."""
    moe_router_topk_scaling_factor: float = 2.5
    """Multiplier on the normalised top-k weights (HF ``routed_scaling_factor``)."""
    moe_router_score_function: str = "sigmoid"
    """Router score function: ``sigmoid`` (Ling 2.0) or ``softmax``."""
    moe_router_enable_expert_bias: bool = True
    """Aux-loss-free balancing: a per-expert fp32 bias used only to select experts."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update, applied once per global batch."""
    moe_router_bias_update: str = "megatron"
    """Expert-bias update rule, once per global batch from the routed-token counts ``c``
    (summed over micro-batches and TP x CP x DP ranks): ``megatron`` adds
    ``rate * sign(mean(c) - c_e)``; ``zero_mean`` (Ling's variant) subtracts the mean of that
    step over the experts, so each layer's biases keep their mean."""
    moe_aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing auxiliary loss (Ling pretrains without it)."""
    moe_z_loss_coeff: float = 3.5e-6
    """Coefficient of the router z-loss, mean(logsumexp(logits)^2)."""
    mtp_num_layers: int = 1
    """Multi-token-prediction layers (HF ``num_nextn_predict_layers``); 0 disables MTP."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP loss added to the LM loss."""


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model and the batch are split across processes."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel size (TP): attention heads and MLP columns split across ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size (PP): layers split into consecutive stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank for the interleaved schedule (VPP); null for none."""
    expert_model_parallel_size: int = 1
    """Expert parallel size (EP): routed experts split across ranks."""
    expert_tensor_parallel_size: int = 1
    """Tensor parallel size inside each expert (ETP). Ling trains with 1."""
    context_parallel_size: int = 1
    """Context parallel size (CP): the sequence split across ranks (needs TransformerEngine)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence inside TP regions (required for MoE with TP > 1)."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach experts: ``alltoall``, ``allgather`` or ``flex`` (DeepEP, GPU only)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer states and fp32 master weights across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the parameter all-gather with the next forward pass (needs the distributed
    optimizer and ``overlap_grad_reduce``)."""


@dataclass(kw_only=True)
class FP8Config:
    """Numeric format of the GEMMs. Named recipes live in ``conf/fp8/``."""

    recipe: str = "bf16"
    """FP8 recipe: ``bf16`` (FP8 off), ``blockwise``, ``blockwise_fp8_params``, ``tensorwise``
    or ``mxfp8``."""
    emulate: bool = False
    """Emulate the recipe's quantisation on any hardware instead of running TE FP8 GEMMs."""
    first_last_layers_bf16: bool = False
    """Keep the first and last ``num_layers_at_start_in_bf16``/``..._at_end_in_bf16`` layers
    in BF16."""
    num_layers_at_start_in_bf16: int = 0
    """Leading decoder layers kept in BF16 when ``first_last_layers_bf16``."""
    num_layers_at_end_in_bf16: int = 0
    """Trailing decoder layers kept in BF16 when ``first_last_layers_bf16``."""
    fp8_param_gather: bool = False
    """Keep primary weights in FP8 and all-gather them in FP8."""
    mtp_projections_bf16: bool = True
    """Keep MTP's enorm/hnorm/eh_proj in BF16 (Ling's choice); only the MTP transformer layer
    runs in FP8."""
    moe_router_padding_for_quantization: bool = False
    """Pad each expert's token count to the FP8 GEMM alignment with zero-probability tokens."""
    on_demand_transpose: bool = False
    """Keep only the row-wise FP8 copy of each weight and build the transposed copy inside the
    backward GEMM (Ling's TE change); lossless with 128x128 blocks."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule."""

    optimizer: str = "adam"
    """``adam`` (AdamW, fp32 moments) or ``adam8bit`` (AdamW with both moments in 8-bit
    blockwise codes: 2.03 bytes per parameter instead of 8; Ling's choice). Checkpoints hold
    fp32 moments either way, so a run can switch between them on resume."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases or the expert bias)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""
    lr_decay_style: str = "cosine"
    """Decay after warm-up: ``constant``, ``linear``, ``cosine`` or ``WSD``."""
    lr_decay_steps: int | None = None
    """Steps over which the rate decays to ``min_lr``; null means ``trainer.max_steps``."""
    use_precision_aware_optimizer: bool = False
    """megatron-core's precision-aware optimizer: TransformerEngine's FusedAdam keeps master
    weights, gradients and moments in the dtypes below (CUDA + TE only; needs
    ``parallel.use_distributed_optimizer``; not with ``adam8bit``)."""
    main_grads_dtype: str = "fp32"
    """Dtype of the optimizer's gradients: ``fp32`` only (megatron-core keeps them in the fp32
    gradient buffer of DDP; the field is passed through for completeness)."""
    main_params_dtype: str = "fp32"
    """Dtype of the master weights with the precision-aware optimizer: ``fp32`` or ``fp16``."""
    exp_avg_dtype: str = "fp32"
    """Dtype of Adam's first moment with the precision-aware optimizer: ``fp32``, ``fp16``,
    ``bf16`` or ``fp8``."""
    exp_avg_sq_dtype: str = "fp32"
    """Dtype of Adam's second moment with the precision-aware optimizer: ``fp32``, ``fp16``,
    ``bf16`` or ``fp8``."""


@dataclass(kw_only=True)
class DataConfig:
    """Where training samples come from. Presets live in ``conf/data/``."""

    source: str = "indexed"
    """``indexed`` (megatron .bin/.idx prefixes, e.g. from data_tools/pretokenize.py),
    ``builtin`` (the built-in corpus: this Python's standard library, tokenized by a small BPE
    trained on it; built on first use) or ``mock`` (megatron's synthetic samples, for smoke
    runs only)."""
    prefixes: list[str] = field(default_factory=list)
    """Indexed-dataset path prefixes (without .bin/.idx)."""
    weights: list[float] | None = None
    """Blend weights, one per prefix; null weighs prefixes by their size."""
    split: str = "99,1,0"
    """Train/validation/test split ratio of every prefix's documents (megatron's: each
    dataset's documents are cut in this ratio). On the command line write ``data.split=98/2/0``
    (Hydra reads an unquoted comma as a list); in YAML ``"98,2,0"`` works too. Every split the
    run reads (training; validation when ``trainer.eval_interval`` > 0) must get tokens from
    every dataset, or the run is refused."""
    seq_length: int = 4096
    """Tokens per training sample."""
    tokenizer: str | None = None
    """HF tokenizer directory; supplies ``eod_token_id`` when that is null."""
    eod_token_id: int | None = None
    """End-of-document token id (Ling: 156892, ``<|endoftext|>``)."""
    eod_mask_loss: bool = False
    """Exclude positions whose input is the end-of-document token from the loss."""
    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token."""
    cache_dir: str | None = None
    """Where megatron caches sample indices; null puts them under the run's output dir."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""


@dataclass(kw_only=True)
class TrainerConfig:
    """The training loop."""

    max_steps: int = 100
    """Optimizer steps to train for (the run stops when it reaches this step)."""
    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step, summed over data-parallel ranks and micro-batches."""
    params_dtype: str = "bf16"
    """Dtype of model parameters and activations: ``fp32``, ``bf16`` or ``fp16``."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    recompute_granularity: str | None = None
    """Activation recompute: null, ``full`` or ``selective``."""
    recompute_modules: list[str] | None = None
    """Modules recomputed under ``selective`` (e.g. ``[moe]``, Ling's choice)."""
    eval_interval: int = 0
    """Run validation every this many steps; 0 disables it."""
    eval_iters: int = 4
    """Validation micro-batches per evaluation, per data-parallel rank."""
    max_minutes: float | None = None
    """Wall-clock budget of one launch, in minutes from the start of training; null for none.
    Before it is spent the run saves a checkpoint and exits with code 75 ("stopped, run me
    again"). Under Slurm the job's end time is a second deadline, used whether or not this is
    set (docs/slurm.md)."""
    stop_margin_seconds: float = 60.0
    """Seconds kept free before a deadline (``max_minutes`` or the Slurm job's end time), on
    top of the time one more step and one checkpoint save take (the slowest of each measured
    in this run, remembered across requeues)."""
    loss_spike_sigma: float | None = 6.0
    """A step whose loss exceeds the mean of the last ``loss_spike_window`` good steps by more
    than this many (sample) standard deviations is a loss spike: it is skipped like a step
    with a non-finite loss or gradient norm (weights, optimizer state, LR schedule and expert
    bias untouched; its batch counts as consumed). null turns spike detection off;
    non-finite steps are always skipped."""
    loss_spike_window: int = 128
    """Good steps whose losses make the spike statistics (mean and standard deviation)."""
    loss_spike_warmup: int = 32
    """Spikes are looked for once the window holds this many good steps (the window is saved
    in checkpoints, so a resumed run needs no new warm-up)."""
    max_consecutive_bad_steps: int = 5
    """After this many bad (skipped) steps in a row the run stops with exit code 3 and saves
    nothing; the message names the newest intact checkpoint."""
    inject_nan_grad_steps: list[int] = field(default_factory=list)
    """Fault injection for drills and tests, empty in real runs: at these steps the last
    data-parallel rank's gradients are NaN (its loss stays finite), as a fault on one rank
    would make them."""
    inject_loss_spike_steps: list[int] = field(default_factory=list)
    """Fault injection for drills and tests, empty in real runs: at these steps every rank's
    loss, and so its gradients, is multiplied by 100."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving, resuming and initialising weights."""

    save_dir: str | None = None
    """Where checkpoints go; null means ``<run.output_dir>/checkpoints``."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end of the run)."""
    save_at_end: bool = True
    """Save a checkpoint when training finishes."""
    resume: bool = True
    """Resume everything (weights, optimizer, scheduler, step, data position, each rank's RNG
    states) from the newest intact checkpoint in ``save_dir`` when there is one. The
    checkpoint must hold the same model; a changed learning-rate schedule needs
    ``override_scheduler`` or ``use_checkpoint_scheduler``; the layout may change."""
    load_dir: str | None = None
    """A checkpoint to resume from (everything, as from ``save_dir``): an ``iter_XXXXXXX``
    directory or a save_dir. It is where a run starts, not where it stays: once the run's own
    ``save_dir`` holds a checkpoint of the same or a later step, that one wins, so a requeued
    job that still sets this goes on from its own progress."""
    init_from: str | None = None
    """Initialise weights only (fresh optimizer, step 0) from this megatron checkpoint."""
    init_from_hf: str | None = None
    """Initialise weights only (fresh optimizer, step 0) from this Hugging Face checkpoint
    directory (config.json + safetensors, e.g. Ling-mini-base-2.0), whose config.json must
    match the model. Excludes ``init_from``; resuming from ``save_dir`` wins over both."""
    hf_init_missing_mtp: bool = False
    """Let ``init_from_hf`` start a model with MTP (``model.mtp_num_layers`` > 0) from a
    checkpoint without MTP layers (``num_nextn_predict_layers`` 0): every other tensor loads,
    the MTP layers keep their fresh initialisation (norms at one, ``eh_proj`` and the
    transformer layer from the model's init). Off: such a checkpoint is refused."""
    keep_last: int = 0
    """Keep only this many newest checkpoints; 0 keeps all. Older ones are deleted only when
    a new checkpoint is complete, so the newest intact checkpoint is never deleted (keep 2 or
    more to survive damage to the newest)."""
    checksums: bool = True
    """Record an xxh3-64 checksum of every file in each checkpoint's ``manifest.json`` (sizes
    are always recorded), checked before the checkpoint is loaded. Measured on CPU: 2-3% of
    the save time (0.07-0.15 s of 3.6-4.9 s for a 1.1 GB checkpoint; 5-10 ms of 0.3-0.6 s for
    ling_tiny's 55 MB), hashed by each rank right after writing; checking on load reads the
    checkpoint once more (docs/slurm.md). Off: truncation and missing files are still found,
    overwritten bytes are not."""
    on_damaged: str = "fallback"
    """What a start does when the newest checkpoint fails verification (missing or truncated
    file, checksum mismatch, unreadable metadata): ``fallback`` logs the file and the problem,
    renames it ``iter_XXXXXXX.damaged`` and resumes from the newest intact checkpoint;
    ``error`` stops with that message and exit code 2 before loading anything."""
    async_save: bool = False
    """Write checkpoints in the background with megatron-core's async torch_dist save while
    training goes on (verified on CPU; on GPUs megatron first copies the tensors to host
    memory). A checkpoint is complete (manifest, rename, ``latest``) only when every rank has
    finished writing; the next save, a stop and the end of training wait for it."""
    override_scheduler: bool = False
    """On resume, this config's learning-rate schedule (``optimizer.lr``, ``min_lr``,
    ``lr_decay_style``, ``lr_decay_steps``, ``lr_warmup_steps``, ``weight_decay``,
    ``trainer.max_steps`` when it sets the decay length) wins over the checkpoint's, from the
    checkpoint's step on (megatron's ``override_opt_param_scheduler``)."""
    use_checkpoint_scheduler: bool = False
    """On resume, the checkpoint's learning-rate schedule wins and this config's differing
    values are ignored (megatron's ``use_checkpoint_opt_param_scheduler``). With neither this
    nor ``override_scheduler`` a resume with a different schedule is refused before any work."""
    seed_checkpoint: bool = False
    """Only build and initialise the model, save it as step 0 and exit: a seed checkpoint any
    parallel layout can start from with ``checkpoint.init_from``."""


@dataclass(kw_only=True)
class LoggingConfig:
    """What a run reports, and where."""

    log_interval: int = 1
    """Write a metrics record (console, ``metrics.jsonl`` and the other sinks) every this many
    steps; time and throughput figures are means over the steps since the last record."""
    tensorboard: bool = False
    """Also write every metrics field as a TensorBoard scalar (training, validation, MTP and
    z-loss curves, throughput, memory, per-layer expert load) to
    ``<run.output_dir>/tensorboard``."""
    wandb: bool = False
    """Also log to Weights & Biases."""
    wandb_project: str = "ling_pretrain"
    """W&B project name."""
    level: str = "INFO"
    """Python logging level of the library's messages."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, the denominator of ``mfu``; null takes the dense BF16 peak
    of the GPU from the table in ``ling_pretrain/runtime/peaks.py`` (docs/benchmarks.md). CPUs
    and GPUs missing from the table have none, and ``mfu`` is then null."""


@dataclass(kw_only=True)
class RunConfig:
    """Identity and location of one training run."""

    name: str = "${model.name}"
    """Run name shown in logs and W&B."""
    output_dir: str = "runs/${run.name}"
    """Directory for config.yaml, metrics.jsonl, checkpoints and plots."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cuda`` or ``cpu``."""
    check_memory: bool = True
    """Refuse before any work a layout whose weights, gradients and optimizer states cannot fit
    in the memory of one device."""
    distributed_timeout_minutes: float = 30.0
    """Timeout of every collective and of process-group start-up, in minutes (megatron-core's
    name). A rank that waits this long for a stalled or dead peer fails, so the job ends
    with a non-zero code instead of idling until its time limit; keep it above the longest
    legitimate wait (rank 0 building dataset indices, a checkpoint save)."""


@dataclass(kw_only=True)
class JobConfig:
    """The whole configuration of a training job (``conf/config.yaml``)."""

    model: ModelConfig = MISSING
    """The architecture; choose a preset with ``+model=<name>``."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass(kw_only=True)
class BenchmarkPoint:
    """One measurement of a benchmark suite: a training job of a few steps."""

    name: str = MISSING
    """Identifier of the point: its result is ``<out-dir>/<name>.json``."""
    row: str = ""
    """Label of the table row (e.g. the model as the published table names it)."""
    nodes: int = 1
    """Nodes the job runs on (more than one only with ``--slurm``)."""
    processes_per_node: int | None = None
    """Training processes (GPUs) per node; null takes the suite's ``processes_per_node``."""
    overrides: list[str] = field(default_factory=list)
    """Hydra overrides of the job after the suite's ``common`` ones (``+model=...`` here)."""
    published_tokens_per_sec: float | None = None
    """The published job-wide tokens/s this point reproduces (null: none); the table shows it
    and the ratio of the measured figure to it."""


@dataclass(kw_only=True)
class BenchmarkSuite:
    """A benchmark suite, ``conf/benchmark/<name>.yaml`` (``launch/benchmark.py suite``)."""

    description: str = ""
    """What the suite measures and where its published figures come from."""
    warmup_steps: int = 3
    """Steps run before the timed ones (compilation, allocator and routing warm-up)."""
    steps: int = 10
    """Timed steps per point; medians and spreads are over these."""
    processes_per_node: int = 1
    """Training processes (GPUs) per node of every point that does not set its own."""
    device_memory_gib: float | None = None
    """Memory of one target GPU; with ``--slurm`` points are validated (layout, memory fit)
    on the submitting machine against it. Null: validate against this machine."""
    compute_capability: list[int] = field(default_factory=lambda: [9, 0])
    """CUDA compute capability of the target GPU for that validation (FP8 needs 9.0+)."""
    common: list[str] = field(default_factory=list)
    """Hydra overrides every point starts from."""
    points: list[BenchmarkPoint] = field(default_factory=list)
    """The points, run in this order."""


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "fp8": FP8Config,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
"""Config group name -> schema; every YAML in ``conf/<group>/`` validates against it."""


def to_container(cfg: Any) -> dict:
    """Resolve an OmegaConf config into plain Python containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
