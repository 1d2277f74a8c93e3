"""Runs one check on the real megatron-core model, alone or under torchrun; writes JSON.

    python tests/train/mcore_worker.py {bias,mtp_grad} OUT_DIR [config overrides...]

``bias``: one global batch through forward/backward with the trainer's gradient
finalisation, for each expert-bias rule in turn from the same biases; records, per MoE layer,
the biases before and after and the routed-token counts of the global batch (all-reduced
over the world, independently of the code under test).

``mtp_grad``: one global batch (micro-batches with different loss masks on every rank)
through the trainer's step functions; records the finalised gradients and, for comparison,
the gradients of Ling's loss written out by hand on the same weights:
``sum(lm token losses) / N + scale * sum(mtp token losses) / M`` over the global batch,
and the same with megatron-core 0.16.1's weighting (``M / N`` on the MTP term).

Every rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ling_pretrain.config import compose
from ling_pretrain.jobs.validate import validate
from ling_pretrain.models.build import build_model
from ling_pretrain.runtime.distributed import init_distributed, world_size_from_env
from ling_pretrain.train.ddp import wrap_ddp
from ling_pretrain.train.moe import make_finalize_model_grads
from ling_pretrain.train.step import forward_step, weighted_microbatches

MICRO_BATCHES = 2


def global_batch(cfg, dp: int, seed: int = 1234) -> list[dict]:
    """Every micro-batch of one global batch (dp x MICRO_BATCHES), with uneven loss masks."""
    g = torch.Generator().manual_seed(seed)
    b, s, v = cfg.trainer.micro_batch_size, cfg.data.seq_length, cfg.model.vocab_size
    batches = []
    for i in range(dp * MICRO_BATCHES):
        tokens = torch.randint(0, v, (b, s), generator=g)
        labels = torch.randint(0, v, (b, s), generator=g)
        mask = (torch.rand(b, s, generator=g) > 0.15 * (i + 1)).float()
        mask[:, -1] = 1.0  # the last position counts for LM, never for MTP
        batches.append(
            {
                "tokens": tokens,
                "labels": labels,
                "loss_mask": mask,
                "position_ids": torch.arange(s).expand(b, s).clone(),
            }
        )
    return batches


def run_step(cfg, model: list, batches: list[dict]) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.zero_grad_buffer()
    iters = weighted_microbatches(
        [iter([dict(b) for b in batches])], len(batches), cfg.model.mtp_num_layers
    )
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=model,
        num_microbatches=len(batches),
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.trainer.micro_batch_size,
        forward_only=False,
    )


def routers(model: list) -> list:
    return [m for c in model for m in c.modules() if getattr(m, "expert_bias", None) is not None]


def check_bias(cfg, model: list, local: list[dict], out: dict) -> None:
    device = torch.device("cpu")
    config = model[0].module.config
    rs = routers(model)
    start = [r.expert_bias.clone() for r in rs]
    for rule in ("megatron", "zero_mean"):
        for r, b in zip(rs, start, strict=True):
            r.expert_bias.copy_(b)
        seen: dict = {}
        inner = make_finalize_model_grads({}, device, rule)

        def finalize(m, *args, _inner=inner, _seen=seen, **kwargs):
            counts = torch.stack([r.local_tokens_per_expert.detach().clone() for r in rs])
            dist.all_reduce(counts)  # PP = 1 here: the world is the TP x CP x DP group
            _seen["counts"] = counts.tolist()
            return _inner(m, *args, **kwargs)

        config.finalize_model_grads_func = finalize
        run_step(cfg, model, local)
        out[rule] = {
            "before": [b.tolist() for b in start],
            "after": [r.expert_bias.tolist() for r in rs],
            "counts": seen["counts"],
            "dtype": [str(r.expert_bias.dtype) for r in rs],
        }


def mtp_logits_capture(module) -> list:
    """Collects the output layer's logits; megatron calls it for MTP first, then the main head."""
    captured: list = []
    module.output_layer.register_forward_hook(lambda _m, _i, o: captured.append(o[0].clone()))
    return captured


def check_mtp_grad(cfg, model: list, local: list[dict], every: list[dict], out: dict) -> None:
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from ling_pretrain.train.mtp import mtp_token_mask

    config = model[0].module.config
    config.finalize_model_grads_func = make_finalize_model_grads({}, torch.device("cpu"))
    rs = routers(model)
    start = [r.expert_bias.clone() for r in rs]
    run_step(cfg, model, local)
    module = model[0].module
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    out["names"] = names
    out["megatron"] = [p.main_grad.double().norm().item() for p in params]
    trained = [p.main_grad.clone() for p in params]

    # The hand-written loss on the same weights and biases (megatron updated the bias).
    for r, b in zip(rs, start, strict=True):
        r.expert_bias.copy_(b)
    captured = mtp_logits_capture(module)
    MTPLossAutoScaler.set_loss_scale(torch.tensor(0.0))  # keep megatron's own MTP gradient out
    n = sum(float(b["loss_mask"].sum()) for b in every)
    m = sum(float(mtp_token_mask(b["loss_mask"]).sum()) for b in every)
    scale = cfg.model.mtp_loss_scaling_factor

    def reference(mtp_denominator: float) -> tuple:
        # A fresh forward each time: megatron's cross entropy reuses its saved tensors in place.
        lm_sum = torch.zeros((), dtype=torch.float64)
        mtp_sum = torch.zeros((), dtype=torch.float64)
        for b in every:
            captured.clear()
            losses = module(
                input_ids=b["tokens"],
                position_ids=b["position_ids"],
                attention_mask=None,
                labels=b["labels"],
                loss_mask=b["loss_mask"],
            )
            lm_sum = lm_sum + (losses.float() * b["loss_mask"]).sum().double()
            mtp_logits = captured[0].float()  # [s, b, vocab]
            mtp_labels = torch.roll(b["labels"], shifts=-1, dims=-1)
            ce = F.cross_entropy(
                mtp_logits.transpose(0, 1).reshape(-1, mtp_logits.shape[-1]),
                mtp_labels.reshape(-1),
                reduction="none",
            ).view_as(b["loss_mask"])
            mtp_sum = mtp_sum + (ce * mtp_token_mask(b["loss_mask"])).sum().double()
        return torch.autograd.grad(lm_sum / n + scale * mtp_sum / mtp_denominator, params)

    ling = reference(m)
    old = reference(n)
    out["n"], out["m"] = n, m
    out["max_abs_diff_ling"] = [
        (g - t).abs().max().item() for g, t in zip(ling, trained, strict=True)
    ]
    out["max_abs_diff_megatron_0_16"] = [
        (g - t).abs().max().item() for g, t in zip(old, trained, strict=True)
    ]
    out["max_abs_ling_vs_0_16"] = [
        (g - o).abs().max().item() for g, o in zip(ling, old, strict=True)
    ]
    out["max_abs_grad"] = [g.abs().max().item() for g in ling]


def main() -> None:
    mode, out_dir, *overrides = sys.argv[1:]
    cfg = compose(overrides)
    validate(cfg, world_size_from_env())
    info = init_distributed(cfg)
    from megatron.core import parallel_state as ps

    model = wrap_ddp(cfg, build_model(cfg))
    model[0].module.config.grad_scale_func = None
    dp = ps.get_data_parallel_world_size()
    every = global_batch(cfg, dp)
    rank = ps.get_data_parallel_rank()
    local = every[rank * MICRO_BATCHES : (rank + 1) * MICRO_BATCHES]
    import megatron.core

    out: dict = {
        "rank": info.rank,
        "megatron_core": megatron.core.__version__,
        "params_dtype": str(next(model[0].module.parameters()).dtype),
    }
    if mode == "bias":
        check_bias(cfg, model, local, out)
    elif mode == "mtp_grad":
        check_mtp_grad(cfg, model, local, every, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    path = Path(out_dir) / f"rank{info.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
