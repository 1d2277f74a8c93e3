"""Metrics sinks: console, metrics.jsonl, TensorBoard (read back with TensorBoard's own reader)
and W&B (offline, read back from its run file); and one real run feeding all of them."""

from __future__ import annotations

import glob
import json
import logging
import struct

import pytest

from ling_pretrain.config import compose
from ling_pretrain.train.metrics import MetricsWriter
from ling_pretrain.train.sinks import (
    ConsoleSink,
    JsonlSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    scalars,
)
from tests.conftest import TINY, read_metrics, run_pretrain


def _record(step: int, loss: float, **extra) -> dict:
    return {"step": step, "loss": loss, "mtp_loss": loss + 0.5, "z_loss": 4.0 - step, **extra}


def _tensorboard(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(directory) -> list[dict]:
    """History rows of W&B's offline run file (what ``wandb sync`` uploads): LevelDB-log
    records (7-byte header: crc32, length, type) in 32 KiB blocks after a 7-byte file
    header, each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(directory / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(path, "rb").read()
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return rows


def test_scalars_name_every_curve_and_expand_layers():
    tags = scalars(
        {
            **_record(3, 2.0, val_loss=2.5, mfu=None),
            "expert_load_max": {"2": 1.5, "5": 1.25},
            "tokens_per_sec": 10.0,
        }
    )
    assert tags == {
        "train/loss": 2.0,
        "train/mtp_loss": 2.5,
        "train/z_loss": 1.0,
        "val/loss": 2.5,
        "moe/expert_load_max/layer_02": 1.5,
        "moe/expert_load_max/layer_05": 1.25,
        "throughput/tokens_per_sec": 10.0,
    }


def test_jsonl_keeps_one_line_per_step_across_resumes(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    sink = JsonlSink(path)
    for step in range(1, 6):
        sink.log(_record(step, 10.0 - step), step)
    sink.close()
    resumed = JsonlSink(path, resume_step=3)  # the checkpoint was at step 3
    resumed.log(_record(4, 0.5), 4)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 9.0),
        (2, 8.0),
        (3, 7.0),
        (4, 0.5),
    ]
    JsonlSink(path, resume_step=0).close()  # a fresh start in the same directory
    assert read_metrics(tmp_path) == []


def test_console_line_and_eta_from_the_median_step(caplog):
    sink = ConsoleSink(max_steps=100)
    with caplog.at_level(logging.INFO, logger="ling_pretrain.train.sinks"):
        for step, seconds in ((1, 9.0), (2, 1.0), (3, 1.2)):
            sink.log(_record(step, 3.0, step_time=seconds, data_wait_time=0.0, mfu=0.25), step)
    line = caplog.records[-1].getMessage()
    assert line.startswith("step      3/100 | loss 3.0000 | mtp 3.5000")
    assert "MFU 25.0%" in line
    # median(9.0, 1.0, 1.2) = 1.2 s x 97 steps left = 116 s
    assert line.endswith("eta 1m56s")
    assert sink.eta(_record(4, 3.0, step_time=1.1)) == pytest.approx(96 * 1.15)


def test_tensorboard_events_read_back_and_resume_purges_later_steps(tmp_path):
    log_dir = tmp_path / "tensorboard"
    sink = TensorBoardSink(str(log_dir))
    for step in range(1, 5):
        extra = {"val_loss": 5.0 + step} if step % 2 == 0 else {}
        sink.log(_record(step, 10.0 - step, **extra, expert_load_max={"2": 1.0 + step}), step)
    sink.close()
    resumed = TensorBoardSink(str(log_dir), resume_step=2)
    for step in (3, 4):
        resumed.log(_record(step, 1.0 / step), step)
    resumed.close()

    curves = _tensorboard(log_dir)
    assert curves["train/loss"] == [(1, 9.0), (2, 8.0), (3, pytest.approx(1 / 3)), (4, 0.25)]
    assert curves["train/mtp_loss"][0] == (1, 9.5)
    assert [s for s, _ in curves["train/z_loss"]] == [1, 2, 3, 4]
    assert curves["val/loss"] == [(2, 7.0)]  # step 4's came from the run that was resumed over
    assert curves["moe/expert_load_max/layer_02"] == [(1, 2.0), (2, 3.0)]


def test_wandb_offline_run_holds_every_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = WandbSink("ling_pretrain", "test", str(tmp_path), {"model": {"name": "x"}})
    sink.log(_record(1, 3.0, val_loss=3.5, expert_load_min={"2": 0.5}), 1)
    sink.log(_record(2, 2.0), 2)
    sink.close()
    rows = _wandb_history(tmp_path)
    assert [r["_step"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] == 3.0 and rows[1]["train/loss"] == 2.0
    assert rows[0]["val/loss"] == 3.5 and rows[0]["train/z_loss"] == 3.0
    assert rows[0]["moe/expert_load_min/layer_02"] == 0.5


class _Broken(Sink):
    def log(self, record, step):
        raise OSError("disk full")


class _Keep(Sink):
    def __init__(self):
        self.steps = []

    def log(self, record, step):
        self.steps.append(step)


def test_a_failing_sink_is_dropped_and_the_others_go_on(tmp_path, caplog):
    cfg = compose(["+model=ling_tiny", "data=mock"])
    keep = _Keep()
    writer = MetricsWriter(str(tmp_path), cfg, extra_sinks=[_Broken(), keep])
    with caplog.at_level(logging.WARNING):
        writer.log(_record(1, 2.0))
        writer.log(_record(2, 1.0))
    writer.close()
    assert keep.steps == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert sum("_Broken failed" in r.getMessage() for r in caplog.records) == 1


FIELDS = {
    "step",
    "loss",
    "mtp_loss",
    "z_loss",
    "lr",
    "grad_norm",
    "skipped",
    "expert_load_max_violation",
    "expert_load_max",
    "expert_load_min",
    "tokens",
    "tokens_per_sec",
    "tokens_per_sec_per_device",
    "tflops_per_device",
    "mfu",
    "mfu_fp8",
    "step_time",
    "data_wait_time",
    "max_memory_bytes",
    "max_memory_reserved_bytes",
}


def test_a_run_feeds_every_sink_the_same_curves(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    proc = run_pretrain(
        out,
        [
            *TINY,
            "trainer.max_steps=4",
            "trainer.eval_interval=2",
            "trainer.eval_iters=1",
            "logging.tensorboard=true",
            "logging.wandb=true",
            "logging.peak_tflops=0.5",
            "checkpoint.save_at_end=false",
        ],
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == FIELDS and set(records[1]) == FIELDS | {"val_loss"}
    for r in records:
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
        assert r["mfu_fp8"] is None and r["max_memory_reserved_bytes"] is None  # CPU, no FP8
        assert r["max_memory_bytes"] > 100 * 2**20  # peak RSS of a megatron process
        assert r["tokens_per_sec"] == pytest.approx(256 / (r["step_time"] + r["data_wait_time"]))
        # ling_tiny: 3 MoE decoder layers (2-4) and the MTP layer (5)
        assert sorted(r["expert_load_max"]) == ["2", "3", "4", "5"]
        assert all(r["expert_load_min"][k] <= 1 <= r["expert_load_max"][k] for k in "2345")

    curves = _tensorboard(out / "tensorboard")
    for key, tag in (
        ("loss", "train/loss"),
        ("mtp_loss", "train/mtp_loss"),
        ("z_loss", "train/z_loss"),
    ):
        assert curves[tag] == [(r["step"], pytest.approx(r[key])) for r in records]
    assert curves["val/loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in records[1::2]]
    assert "throughput/mfu" in curves and "memory/max_memory_bytes" in curves

    rows = _wandb_history(out)
    assert [r["train/loss"] for r in rows] == pytest.approx([r["loss"] for r in records])
    assert [r.get("val/loss") for r in rows][1::2] == pytest.approx(
        [r["val_loss"] for r in records[1::2]]
    )

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = proc.stderr + proc.stdout
    assert "run finished at step 4 (4 steps this run, from step 0)" in log
    assert f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}" in log
    assert str(out / "loss.png") in log and str(out / "config.yaml") in log
    assert "eta " in log
