"""Takes training steps through the trainer's own step function, alone or under torchrun, and
records what a bad step changed; writes JSON.

    python tests/train/bad_step_worker.py OUT_DIR STEPS BAD_STEP [config overrides...]

Runs steps 1..STEPS (the config's ``trainer.inject_*_steps`` make BAD_STEP bad). Just before
and just after BAD_STEP it takes a snapshot of every tensor a step may change: the model's
parameters and buffers (the expert bias), the fp32 master weights and every entry of the
inner optimizers' state (both moments or their 8-bit codes and scales, the per-parameter
steps), the param groups' step and lr, and the scheduler's state. It records which entries
differ byte for byte, what each step reported, and a fingerprint of every micro-batch each
step read (to tell whether a bad step's batch is consumed).

Every rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ling_pretrain.config import compose
from ling_pretrain.jobs.validate import validate
from ling_pretrain.optim.adam8bit import inner_optimizers
from ling_pretrain.runtime.distributed import (
    destroy_distributed,
    init_distributed,
    world_size_from_env,
)
from ling_pretrain.train.bad_steps import BadStepPolicy
from ling_pretrain.train.setup import setup
from ling_pretrain.train.step import train_step


class Recording:
    """Passes batches on and keeps a fingerprint of each."""

    def __init__(self, it):
        self.it, self.seen = it, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        tokens = batch["tokens"]
        self.seen.append([int(tokens.sum()), *tokens.flatten()[:4].tolist()])
        return batch


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(parts) -> dict:
    """Every tensor and scalar a training step may change, by a readable name."""
    out: dict = {}
    for i, chunk in enumerate(parts.model):
        for name, p in chunk.named_parameters():
            out[f"model{i}.param.{name}"] = _bytes(p)
        for name, b in chunk.named_buffers():
            out[f"model{i}.buffer.{name}"] = _bytes(b)
    for k, inner in enumerate(inner_optimizers(parts.optimizer)):
        for g, group in enumerate(inner.param_groups):
            out[f"optim{k}.group{g}.lr"] = group["lr"]
            out[f"optim{k}.group{g}.step"] = group.get("step")
            for j, p in enumerate(group["params"]):
                out[f"optim{k}.group{g}.main_param{j}"] = _bytes(p)
                for key, value in inner.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        out[f"optim{k}.group{g}.state{j}.{key}"] = _bytes(value)
    out["scheduler"] = json.dumps(parts.scheduler.state_dict(), sort_keys=True, default=str)
    return out


def differences(a: dict, b: dict) -> list[str]:
    names = sorted(set(a) | set(b))
    changed = []
    for n in names:
        x, y = a.get(n), b.get(n)
        same = (
            torch.equal(x, y)
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            else x == y
        )
        if not same:
            changed.append(n)
    return changed


def main() -> None:
    out_dir, steps, bad_step, *overrides = sys.argv[1:]
    steps, bad_step = int(steps), int(bad_step)
    cfg = compose(overrides)
    layout = validate(cfg, world_size_from_env())
    info = init_distributed(cfg)
    try:
        parts = setup(cfg, layout, info.device, str(Path(out_dir) / "checkpoints"))
        parts.train_iters = [Recording(it) for it in parts.train_iters]
        policy = BadStepPolicy(cfg.trainer)
        result: dict = {"rank": info.rank, "steps": [], "batches": []}
        for step in range(1, steps + 1):
            if step == bad_step:
                before = snapshot(parts)
            seen = len(parts.train_iters[0].seen)
            r = train_step(parts, layout.num_microbatches, step, policy)
            result["batches"].append(parts.train_iters[0].seen[seen:])
            result["steps"].append(
                {
                    "loss": r.loss,
                    "grad_norm": r.grad_norm,
                    "skipped": r.skipped,
                    "reason": r.skip_reason,
                    "lr": parts.optimizer.param_groups[0]["lr"],
                }
            )
            if step == bad_step:
                after = snapshot(parts)
                result["changed"] = differences(before, after)
                result["compared"] = sorted(before)
        result["policy"] = policy.state_dict()
        path = Path(out_dir) / f"rank{info.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
        dist.barrier()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
