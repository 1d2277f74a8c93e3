"""Fixtures for conversion tests: a world of one process in this interpreter, and a random
ling_tiny checkpoint in HF layout written by our exporter from known tensors."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, script_cmd, subprocess_env

CONVERT = REPO / "launch" / "convert.py"
TINY_MODEL = ["+model=ling_tiny", "data=mock", "data.seq_length=32"]


def tiny_cfg(params_dtype: str = "fp32"):
    from ling_pretrain.config import compose

    return compose([*TINY_MODEL, f"trainer.params_dtype={params_dtype}"])


@contextlib.contextmanager
def world_of_one():
    """megatron's process groups for one process; torn down only if this call made them."""
    from megatron.core import parallel_state

    from ling_pretrain.runtime.distributed import destroy_distributed, init_distributed

    made = not parallel_state.model_parallel_is_initialized()
    if made:
        init_distributed(tiny_cfg())
    try:
        yield
    finally:
        if made:
            destroy_distributed()


def randomize(chunks: list, seed: int = 0) -> None:
    """Give every tensor distinct values: weights N(0, 0.02), norms 1 + N(0, 0.1), and a
    non-zero fp32 expert bias whose values are not representable in bf16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.copy_(1 + 0.1 * noise if "norm" in name else 0.02 * noise)
            for name, b in chunk.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(1e-3 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in an HF directory, as stored (FP8 data and scales included)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def run_convert(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 240):
    cmd = script_cmd(CONVERT, args, nproc)
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Path:
    """An fp32 HF checkpoint of ling_tiny (MTP included) with random weights and bias."""
    from ling_pretrain.checkpoint.hf.exporter import export_hf
    from ling_pretrain.models.build import build_model
    from ling_pretrain.models.registry import get_family

    out = tmp_path_factory.mktemp("hf") / "tiny_fp32"
    with world_of_one():
        cfg = tiny_cfg("fp32")
        chunks = build_model(cfg)
        randomize(chunks)
        export_hf(chunks, cfg, get_family(cfg.model).hf, out, dtype="fp32")
    return out
