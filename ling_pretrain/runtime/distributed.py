"""Process groups, device and seeds for one training process.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK) and as a plain ``python``
process (a world of one). NCCL on CUDA, gloo on CPU, where the CPU runtime is installed
before megatron-core builds anything.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ling_pretrain.runtime import cpu

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def world_size_from_env() -> int:
    """World size torchrun gives this process (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Any) -> DistInfo:
    """Create the default process group and megatron's model-parallel groups, and seed.

    Args:
        cfg: the validated job config.

    Returns:
        This process's rank, world size and device.
    """
    use_cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
    if not use_cuda:
        cpu.install()
    rank = int(os.environ.get("RANK", "0"))
    world = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout_minutes = cfg.run.distributed_timeout_minutes
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )

    from megatron.core import parallel_state

    p = cfg.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(cfg.trainer.seed)
    return DistInfo(rank, world, local_rank, device)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron's tensor-parallel RNG tracker.

    Every rank uses the same base seed, so weights initialised on the CPU (the full matrix,
    then this rank's slice) are identical whatever the parallel layout.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    """Whether this is global rank 0 (True before the process group exists)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group). Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
