"""Collectives the CPU runtime adapts for gloo, across two real processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _worker(rank: int, port: int, out: dict) -> None:
    from ling_pretrain.runtime import cpu

    cpu.install()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Uneven all_gather: rank r contributes r + 1 rows (NCCL allows it, gloo does not).
        mine = torch.full((rank + 1, 3), float(rank + 1))
        parts = [torch.empty(r + 1, 3) for r in range(2)]
        dist.all_gather(parts, mine)
        # all_to_all_single with split sizes given as tensors (megatron passes those on CPU).
        send = torch.arange(3, dtype=torch.float32) + 10 * rank
        in_splits = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])
        out_splits = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])
        recv = torch.empty(int(out_splits.sum()))
        dist.all_to_all_single(
            recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits
        )
        out[rank] = ([p.tolist() for p in parts], recv.tolist())
    finally:
        dist.destroy_process_group()


def test_uneven_all_gather_and_tensor_split_all_to_all():
    from ling_pretrain.runtime.distributed import _free_port

    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    for rank in range(2):
        gathered, received = results[rank]
        assert gathered == [[[1.0] * 3], [[2.0] * 3, [2.0] * 3]]
    assert results[0][1] == [0.0, 10.0, 11.0]
    assert results[1][1] == [1.0, 2.0, 12.0]
