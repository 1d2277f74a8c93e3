"""MTP gradients survive activation recompute, alone and with pipeline parallelism.

Upstream, MTP + recompute crashed, dropped gradients silently or opened an MTP loss gap.
Recompute changes memory, never numbers: losses and gradient norms must equal the run
without it.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

RECOMPUTE = {
    "full": ["trainer.recompute_granularity=full"],
    "selective_moe": ["trainer.recompute_granularity=selective", "trainer.recompute_modules=[moe]"],
}


def _run(out, seed, extra, nproc=1):
    run_pretrain(
        out,
        [
            *TINY,
            "trainer.max_steps=2",
            f"checkpoint.init_from={seed}",
            "checkpoint.save_at_end=false",
            *extra,
        ],
        nproc=nproc,
    )
    return read_metrics(out)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("mode", list(RECOMPUTE))
def test_recompute_changes_no_number(tmp_path, seed_checkpoint, mode, pp):
    layout = [f"parallel.pipeline_model_parallel_size={pp}"] if pp > 1 else []
    nproc = pp
    plain = _run(tmp_path / "plain", seed_checkpoint, layout, nproc)
    recomputed = _run(tmp_path / mode, seed_checkpoint, [*layout, *RECOMPUTE[mode]], nproc)
    for a, b in zip(plain, recomputed, strict=True):
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
