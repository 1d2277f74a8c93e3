"""Per-step throughput figures: time base, FLOP/s, MFU against the peak table, data wait."""

from __future__ import annotations

import logging

import pytest
import torch

from ling_pretrain.config import compose
from ling_pretrain.core.layout import derive_layout
from ling_pretrain.models.registry import get_family
from ling_pretrain.train import throughput


def _meter(monkeypatch, device_name: str | None, *overrides: str, world: int = 8):
    cfg = compose(
        [
            "+model=ling_mini",
            "data=mock",
            "data.seq_length=4096",
            "trainer.global_batch_size=128",
            "parallel.expert_model_parallel_size=8",
            *overrides,
        ]
    )
    layout = derive_layout(cfg, world)
    if device_name is None:
        return cfg, throughput.Meter(cfg, layout, torch.device("cpu"))
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device=None: device_name)
    monkeypatch.setattr(throughput, "peak_memory", lambda device: (60 * 2**30, 64 * 2**30))
    return cfg, throughput.Meter(cfg, layout, torch.device("cuda"))


def test_ling_table_figures_on_h100(monkeypatch):
    """Ling's Ling-mini row at 8 GPUs: 109,532 tokens/s -> 135 TFLOP/s/GPU, MFU 13.7%."""
    cfg, meter = _meter(monkeypatch, "NVIDIA H100 80GB HBM3", "fp8=blockwise")
    seconds = 128 * 4096 / 109_532
    fig = meter.figures(steps=2, busy=2 * seconds * 0.9, wait=2 * seconds * 0.1)
    assert fig["tokens_per_sec"] == pytest.approx(109_532)
    assert fig["tokens_per_sec_per_device"] == pytest.approx(109_532 / 8)
    fpt = get_family(cfg.model).flops_per_token(cfg.model, 4096)
    assert fig["tflops_per_device"] == pytest.approx(fpt * 109_532 / 8 / 1e12)
    assert round(fig["tflops_per_device"]) == 135
    assert fig["mfu"] == pytest.approx(fig["tflops_per_device"] / 989)
    assert fig["mfu_fp8"] == pytest.approx(fig["tflops_per_device"] / 1979)
    assert fig["step_time"] == pytest.approx(seconds * 0.9)
    assert fig["data_wait_time"] == pytest.approx(seconds * 0.1)
    assert fig["max_memory_bytes"] == 60 * 2**30
    assert fig["max_memory_reserved_bytes"] == 64 * 2**30


def test_bf16_and_emulated_fp8_runs_have_no_fp8_mfu(monkeypatch):
    for overrides in ([], ["fp8=blockwise", "fp8.emulate=true"]):
        _, meter = _meter(monkeypatch, "NVIDIA H200", *overrides)
        fig = meter.figures(1, 1.0, 0.0)
        assert fig["mfu"] is not None and fig["mfu_fp8"] is None


def test_unknown_gpu_has_null_mfu_and_one_warning(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="ling_pretrain.train.throughput"):
        _, meter = _meter(monkeypatch, "NVIDIA L40S")
        figs = [meter.figures(1, 1.0, 0.0) for _ in range(3)]
    assert all(f["mfu"] is None for f in figs)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "NVIDIA L40S" in warnings[0] and "peak_tflops" in warnings[0]
    _, meter = _meter(monkeypatch, "NVIDIA L40S", "logging.peak_tflops=362")
    assert meter.figures(1, 1.0, 0.0)["mfu"] == pytest.approx(
        meter.figures(1, 1.0, 0.0)["tflops_per_device"] / 362
    )


def test_cpu_has_mfu_only_with_a_peak(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        _, meter = _meter(monkeypatch, None)
        fig = meter.figures(1, 2.0, 0.0)
    assert fig["mfu"] is None and fig["mfu_fp8"] is None and not caplog.records
    assert fig["max_memory_bytes"] > 0 and fig["max_memory_reserved_bytes"] is None
    _, meter = _meter(monkeypatch, None, "logging.peak_tflops=2.0")
    fig = meter.figures(1, 2.0, 0.0)
    assert fig["mfu"] == pytest.approx(fig["tflops_per_device"] / 2.0)


def test_step_timer_takes_the_data_wait_out(monkeypatch):
    import time

    clock = throughput.WaitClock()
    timer = throughput.StepTimer(clock)

    def slow():
        while True:
            time.sleep(0.05)
            yield 1

    batches = clock.wrap(slow())
    for _ in range(2):
        timer.start()
        next(batches)
        time.sleep(0.02)
        timer.stop()
    steps, busy, wait = timer.take()
    assert steps == 2
    assert wait == pytest.approx(0.1, abs=0.03)
    assert busy == pytest.approx(0.04, abs=0.03)
    assert timer.take() == (0, 0.0, 0.0)
