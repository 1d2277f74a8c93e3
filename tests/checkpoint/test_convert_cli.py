"""launch/convert.py run as a user runs it (python / torchrun), across layouts, and training
that starts from an HF directory (checkpoint.init_from_hf)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoint.conftest import assert_same_tensors, read_all, run_convert
from tests.conftest import TINY, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def mcore_tp2(hf_tiny, tmp_path_factory) -> Path:
    """hf_tiny converted at TP2 + sequence parallel (model derived from config.json)."""
    out = tmp_path_factory.mktemp("mcore") / "tp2"
    proc = run_convert(
        ["hf-to-mcore", "--hf-dir", str(hf_tiny), "--out-dir", str(out), "--tp", "2"], nproc=2
    )
    assert "loading HF tensors" in proc.stderr + proc.stdout  # progress is shown
    assert (out / "latest").read_text().strip() == "iter_0000000"
    return out


def _assert_bf16_of(source: dict, exported: dict) -> None:
    """Each weight is the source rounded to bf16; the expert bias is the source's fp32 value."""
    assert source.keys() == exported.keys()
    for key, value in source.items():
        if key.endswith("expert_bias"):
            assert exported[key].dtype == torch.float32 and torch.equal(exported[key], value)
        else:
            assert exported[key].dtype == torch.bfloat16
            assert torch.equal(exported[key], value.to(torch.bfloat16)), key


@pytest.mark.parametrize(
    "import_layout,export_layout,dtype",
    [
        (None, ["--ep", "2"], "fp32"),  # TP2+SP import (fixture) -> EP2 export
        # bf16 params, TP2 x EP2 import -> PP2 + VPP2 export (MTP and its embedding copy on
        # the last stage)
        (["--tp", "2", "--ep", "2"], ["--pp", "2", "--vpp", "2"], "bf16"),
    ],
    ids=["fp32-tp2-to-ep2", "bf16-tp2ep2-to-pp2vpp2"],
)
def test_round_trip_across_layouts(
    hf_tiny, mcore_tp2, tmp_path, import_layout, export_layout, dtype
):
    if import_layout is None:
        mcore = mcore_tp2
    else:
        mcore = tmp_path / "mcore"
        args = ["hf-to-mcore", "--hf-dir", str(hf_tiny), "--out-dir", str(mcore), "--dtype", dtype]
        run_convert([*args, *import_layout], nproc=2)
    back = tmp_path / "hf"
    args = ["mcore-to-hf", "--checkpoint", str(mcore), "--out-dir", str(back), "--dtype", dtype]
    run_convert([*args, *export_layout], nproc=2)
    if dtype == "fp32":
        assert_same_tensors(read_all(hf_tiny), read_all(back))
    else:
        _assert_bf16_of(read_all(hf_tiny), read_all(back))


def test_bf16_export_at_tp2_ep2(hf_tiny, mcore_tp2, tmp_path):
    """bf16 export of an fp32 checkpoint, at TP2 x EP2: each weight is the source rounded to
    bf16, the expert bias is the source's fp32 value."""
    out = tmp_path / "bf16"
    args = ["mcore-to-hf", "--checkpoint", str(mcore_tp2), "--out-dir", str(out), "--dtype", "bf16"]
    run_convert([*args, "--tp", "2", "--ep", "2"], nproc=2)
    _assert_bf16_of(read_all(hf_tiny), read_all(out))


def test_hf_to_mcore_refuses_mismatching_preset(hf_tiny, tmp_path):
    proc = run_convert(
        ["hf-to-mcore", "--hf-dir", str(hf_tiny), "--out-dir", str(tmp_path / "x")]
        + ["+model=ling_tiny", "model.num_moe_experts=16"],
        check=False,
    )
    assert proc.returncode != 0
    assert "num_experts=8 but model.num_moe_experts=16" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_mcore_to_hf_needs_the_model(mcore_tp2, tmp_path):
    bare = tmp_path / "bare"
    (bare / "iter_0000000").mkdir(parents=True)
    for f in (mcore_tp2 / "iter_0000000").iterdir():
        (bare / "iter_0000000" / f.name).symlink_to(f)
    proc = run_convert(
        [
            "mcore-to-hf",
            "--checkpoint",
            str(bare / "iter_0000000"),
            "--out-dir",
            str(tmp_path / "o"),
        ],
        check=False,
    )
    assert proc.returncode != 0 and "+model=<preset>" in proc.stderr


def test_init_from_hf_equals_init_from_converted(hf_tiny, mcore_tp2, tmp_path):
    common = [*TINY, "trainer.max_steps=1", "checkpoint.save_at_end=false"]
    from_hf = [*TINY, f"checkpoint.init_from_hf={hf_tiny}"]
    run_pretrain(tmp_path / "hf", [*from_hf, "trainer.max_steps=1"])
    run_pretrain(tmp_path / "mc", [*common, f"checkpoint.init_from={mcore_tp2}"])
    run_pretrain(
        tmp_path / "pp2",
        [*common, f"checkpoint.init_from_hf={hf_tiny}", "parallel.pipeline_model_parallel_size=2"],
        nproc=2,
    )
    (hf,), (mc,), (pp2,) = (read_metrics(tmp_path / d) for d in ("hf", "mc", "pp2"))
    assert hf["step"] == 1 and hf["loss"] == mc["loss"] and hf["mtp_loss"] == mc["mtp_loss"]
    # PP2 holds MTP and its own copy of the embedding on the last stage; both loaded.
    assert pp2["loss"] == pytest.approx(hf["loss"], abs=1e-5)
    assert pp2["mtp_loss"] == pytest.approx(hf["mtp_loss"], abs=1e-5)
    # Started again with init_from_hf still set, the run resumes its own checkpoint (step 1)
    # instead of re-initialising from the HF weights.
    proc = run_pretrain(tmp_path / "hf", [*from_hf, "trainer.max_steps=2"])
    assert "resuming from" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "hf")] == [1, 2]


def test_init_from_hf_refused_before_training(hf_tiny, tmp_path):
    proc = run_pretrain(
        tmp_path / "bad",
        [*TINY, f"checkpoint.init_from_hf={hf_tiny}", "model.hidden_size=256"],
        check=False,
    )
    assert proc.returncode != 0
    assert "hidden_size=128 but model.hidden_size=256" in proc.stderr
    proc = run_pretrain(
        tmp_path / "bad2", [*TINY, f"checkpoint.init_from_hf={tmp_path / 'nowhere'}"], check=False
    )
    assert proc.returncode != 0 and "no such directory" in proc.stderr


def test_export_never_deletes_what_it_did_not_write(mcore_tp2, tmp_path):
    """A directory of the user's (a git checkout, notes) is refused as it is; a previous export
    is replaced only with --overwrite, and then only its own files."""
    repo = tmp_path / "checkout"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "notes.txt").write_text("mine")
    export = ["mcore-to-hf", "--checkpoint", str(mcore_tp2), "--dtype", "fp32"]
    proc = run_convert([*export, "--out-dir", str(repo), "--overwrite"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is not empty and is not a previous Hugging Face export" in proc.stderr
    assert ".git/, notes.txt" in proc.stderr
    assert sorted(p.name for p in repo.iterdir()) == [".git", "notes.txt"]
    assert (repo / ".git" / "HEAD").is_file() and (repo / "notes.txt").read_text() == "mine"

    out = tmp_path / "hf"
    proc = run_convert([*export, "--out-dir", str(out)])
    assert "wrote model-00001-of-00001.safetensors" in proc.stderr  # the file's real name
    assert "part-rank" not in proc.stderr + proc.stdout
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert first and all(p.stat().st_mode & 0o777 == 0o644 for p in out.glob("*.safetensors"))
    proc = run_convert([*export, "--out-dir", str(out)], check=False)
    assert proc.returncode != 0 and "Pass --overwrite" in proc.stderr
    (out / "README.md").write_text("served from here")
    proc = run_convert([*export, "--out-dir", str(out), "--overwrite"])
    assert "no template directory" in proc.stderr  # the export has no tokenizer: say so
    assert (out / "README.md").read_text() == "served from here"
    assert set(first) == {p.name for p in out.glob("*.safetensors")}
    assert all(p.stat().st_mtime_ns != first[p.name] for p in out.glob("*.safetensors"))
    assert not (tmp_path / "hf.partial").exists() and not (tmp_path / "hf.old").exists()


def test_hf_to_mcore_refuses_a_directory_it_did_not_write(hf_tiny, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    proc = run_convert(
        ["hf-to-mcore", "--hf-dir", str(hf_tiny), "--out-dir", str(out)], check=False
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "not a previous megatron conversion" in proc.stderr and "metrics.jsonl" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
