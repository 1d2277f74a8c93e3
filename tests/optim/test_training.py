"""The 8-bit Adam in real training runs: loss vs fp32 Adam, exact resume, checkpoints that
plain Adam loads and back (megatron's distributed optimizer under DP2 included)."""

from __future__ import annotations

from statistics import mean

import pytest

from tests.conftest import TINY, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

KEYS = ("loss", "mtp_loss", "grad_norm", "lr")
REL_8BIT = 1e-3


def test_loss_after_100_steps_within_one_percent_of_fp32_adam(tmp_path):
    common = [*TINY, "trainer.max_steps=100"]
    run_pretrain(tmp_path / "adam", common, timeout=600)
    run_pretrain(tmp_path / "adam8bit", [*common, "optimizer.optimizer=adam8bit"], timeout=600)
    adam, eight = read_metrics(tmp_path / "adam"), read_metrics(tmp_path / "adam8bit")
    assert len(adam) == len(eight) == 100
    assert adam[0]["loss"] == eight[0]["loss"]  # same start, same data
    final_adam = mean(r["loss"] for r in adam[-10:])
    final_eight = mean(r["loss"] for r in eight[-10:])
    assert final_adam < adam[0]["loss"] - 2.0  # it learned something worth comparing
    assert abs(final_eight - final_adam) / final_adam < 0.01
    assert adam[-1]["loss"] != eight[-1]["loss"]  # the 8-bit moments were really used


def _ckpt(run, step: int) -> str:
    return f"checkpoint.load_dir={run / 'checkpoints' / f'iter_{step:07d}'}"


def test_dp2_resume_is_exact_and_plain_adam_resumes_the_8bit_checkpoint(tmp_path):
    common = [
        *TINY,
        "optimizer.optimizer=adam8bit",
        "optimizer.lr_decay_style=cosine",
        "optimizer.min_lr=1e-4",
        "optimizer.lr_warmup_steps=2",
        "trainer.max_steps=6",
    ]
    straight, resumed, to_adam = tmp_path / "straight", tmp_path / "resumed", tmp_path / "to_adam"
    # The uninterrupted run also saves at step 3 (saving must not change the 8-bit state);
    # the others start new processes from that checkpoint, as a preempted job would.
    run_pretrain(straight, [*common, "checkpoint.save_interval=3"], nproc=2)
    run_pretrain(resumed, [*common, _ckpt(straight, 3)], nproc=2)
    run_pretrain(to_adam, [*common, _ckpt(straight, 3), "optimizer.optimizer=adam"], nproc=2)

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [4, 5, 6]
    for ra, rb in zip(a[3:], b, strict=True):
        for key in KEYS:
            assert rb[key] == ra[key], (ra["step"], key)

    # The checkpoint holds fp32 moments and the step: plain AdamW resumed from it makes
    # exactly the update the 8-bit Adam makes at step 4 (both decode the same moments), so
    # the loss after it (step 5) is the same; they part only once the 8-bit Adam re-rounds.
    c = read_metrics(to_adam)
    assert [r["step"] for r in c] == [4, 5, 6]
    assert c[0]["loss"] == a[3]["loss"] and c[0]["grad_norm"] == a[3]["grad_norm"]
    assert c[1]["loss"] == a[4]["loss"]
    assert c[2]["loss"] == pytest.approx(a[5]["loss"], rel=REL_8BIT)


def test_8bit_adam_resumes_a_plain_adam_checkpoint(tmp_path):
    ref, to_8bit = tmp_path / "ref", tmp_path / "to_8bit"
    common = [*TINY, "trainer.max_steps=5"]
    run_pretrain(ref, [*common, "checkpoint.save_interval=3"])
    run_pretrain(to_8bit, [*common, _ckpt(ref, 3), "optimizer.optimizer=adam8bit"])
    r, e = read_metrics(ref), read_metrics(to_8bit)
    assert [x["step"] for x in e] == [4, 5]
    assert e[0]["loss"] == r[3]["loss"]  # same weights after step 3
    # Step 5 follows from the loaded fp32 moments and step, rounded to 8 bits: close to
    # fp32 Adam's own continuation.
    assert e[1]["loss"] == pytest.approx(r[4]["loss"], rel=REL_8BIT)
    assert e[1]["loss"] != r[4]["loss"]


def test_resume_is_exact_without_the_distributed_optimizer_in_bf16(tmp_path):
    # megatron's Float16OptimizerWithFloat16Params: whole fp32 master tensors, not shards.
    common = [
        *TINY,
        "optimizer.optimizer=adam8bit",
        "trainer.params_dtype=bf16",
        "parallel.use_distributed_optimizer=false",
        "optimizer.lr_warmup_steps=1",
        "optimizer.lr_decay_style=linear",
        "optimizer.min_lr=1e-4",
        "trainer.max_steps=4",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_pretrain(straight, [*common, "checkpoint.save_interval=2"])
    run_pretrain(resumed, [*common, _ckpt(straight, 2)])
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b, strict=True):
        for key in KEYS:
            assert rb[key] == ra[key], (ra["step"], key)
