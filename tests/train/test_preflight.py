"""The checks and records made before a Slurm job starts training
(``python -m ling_pretrain.train.preflight``, run by launch/slurm/pretrain.sbatch)."""

from __future__ import annotations

from ling_pretrain.train import preflight


def test_preflight_reports_bad_input_with_code_2(tmp_path, capsys):
    base = ["--", "+model=ling_tiny", "data=mock"]
    one = ["--world-size", "1", "--nproc-per-node", "1"]
    three = ["--world-size", "3", "--nproc-per-node", "1"]
    ep2 = "parallel.expert_model_parallel_size=2"
    assert preflight.main([*three, *base, ep2, f"run.output_dir={tmp_path}"]) == 2
    assert "world size 3 is not a multiple" in capsys.readouterr().err
    assert preflight.main([*one, *base, "run.output_dir=/proc/x"]) == 2
    assert "run.output_dir=/proc/x is not writable" in capsys.readouterr().err
    assert preflight.main([*one, "--", "+model=nope"]) == 2
    assert "conf/model/ has no preset 'nope'" in capsys.readouterr().err


def test_preflight_resolves_the_trainers_directories_and_records(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = preflight.main(
        [
            "--world-size",
            "2",
            "--nproc-per-node",
            "1",
            "--record",
            "job-1.0",
            "--",
            "+model=ling_tiny",
            "data=mock",
            "run.output_dir=rel/run",
        ]
    )
    assert code == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["RUN_DIR"] == str(tmp_path / "rel" / "run")
    assert lines["SAVE_DIR"] == str(tmp_path / "rel" / "run" / "checkpoints")
    records = tmp_path / "rel" / "run" / "records" / "job-1.0"
    assert "run.output_dir=rel/run" in (records / "overrides.txt").read_text()
    assert "torch==" in (records / "pip-freeze.txt").read_text()
    assert "PyTorch version" in (records / "collect-env.txt").read_text()
    assert "git rev-parse HEAD" in (records / "git.txt").read_text()
    assert "output_dir: rel/run" in (records / "config.yaml").read_text()
