"""Every parallel layout computes the same model as one process (fp32, gloo).

All runs start from one seed checkpoint, so they share weights whatever their layout; the
first step's loss must then agree with the single-process run to 1e-5, and a few steps of
training must lower the loss.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

STEPS = 4
LAYOUTS = {
    "dp2": [],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "tp2_sp_etp2": [
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "parallel.expert_tensor_parallel_size=2",
    ],
    "ep2": ["parallel.expert_model_parallel_size=2"],
    "ep2_allgather": [
        "parallel.expert_model_parallel_size=2",
        "parallel.moe_token_dispatcher_type=allgather",
    ],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "pp2_vpp2": [
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
    ],
}


def _run(tmp_path, seed_checkpoint, name, extra, nproc):
    out = tmp_path / name
    run_pretrain(
        out,
        [
            *TINY,
            f"trainer.max_steps={STEPS}",
            f"checkpoint.init_from={seed_checkpoint}",
            "checkpoint.save_at_end=false",
            *extra,
        ],
        nproc=nproc,
    )
    return read_metrics(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, seed_checkpoint):
    return _run(tmp_path_factory.mktemp("ref"), seed_checkpoint, "single", [], nproc=1)


def test_single_process_trains(reference):
    losses = [r["loss"] for r in reference]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.02, losses
    assert all(r["mtp_loss"] is not None and r["mtp_loss"] > 0 for r in reference)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, seed_checkpoint):
    cache: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            cache[name] = _run(
                tmp_path_factory.mktemp(name), seed_checkpoint, name, LAYOUTS[name], 2
            )
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(layout_runs, reference, name):
    records = layout_runs(name)
    assert len(records) == STEPS
    assert records[0]["loss"] == pytest.approx(reference[0]["loss"], abs=1e-5)
    assert records[0]["mtp_loss"] == pytest.approx(reference[0]["mtp_loss"], abs=1e-5)
    # megatron-core keeps each rank's own z-loss (no data-parallel reduction); logging rank 0's
    # share gave 4.393 under DP2 against 4.414 here, with identical losses and gradients.
    assert records[0]["z_loss"] == pytest.approx(reference[0]["z_loss"], rel=1e-5)
    # The same tokens reach the same experts: per-layer load gathered from every stage.
    for key in ("expert_load_max", "expert_load_min"):
        assert records[0][key] == pytest.approx(reference[0][key], rel=1e-6), key
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0] - 0.02, losses


# Tensor parallelism changes fp32 summation order (sequence-parallel reduce-scatters, the
# vocab-parallel cross entropy): gradient norms then agree to ~2e-5, not to rounding. The
# bound still catches real errors: experts replicated across TP ranks whose gradients were
# never summed (megatron-core only routes expert gradients to the expert-data-parallel
# reduction when EP > 1) moved the norm by 1.6e-4.
GRAD_NORM_RTOL = {"tp2_sp": 1e-4, "tp2_sp_etp2": 1e-4}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gradients_match_single_process(layout_runs, reference, name):
    records = layout_runs(name)
    rtol = GRAD_NORM_RTOL.get(name, 2e-5)
    for ref, rec in zip(reference, records, strict=True):
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=rtol), rec["step"]


def test_validation_loss_is_logged_and_layout_independent(tmp_path, seed_checkpoint):
    """Evaluation runs the same validation samples through any layout."""
    extra = [
        "trainer.max_steps=2",
        "trainer.eval_interval=2",
        "trainer.eval_iters=2",
        f"checkpoint.init_from={seed_checkpoint}",
        "checkpoint.save_at_end=false",
    ]
    run_pretrain(tmp_path / "one", [*TINY, *extra])
    run_pretrain(
        tmp_path / "pp2", [*TINY, *extra, "parallel.pipeline_model_parallel_size=2"], nproc=2
    )
    one, pp2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "pp2")
    assert "val_loss" not in one[0] and "val_loss" in one[1]
    assert 0 < one[1]["val_loss"] < 20
    assert pp2[1]["val_loss"] == pytest.approx(one[1]["val_loss"], abs=1e-5)
