"""The rule for a run that meets an existing checkpoint, decided from its files before any
process group: which checkpoint, another model refused, a changed schedule only by choice,
layout and other changes allowed (ling_pretrain.jobs.resume)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ling_pretrain.checkpoint.dist import FORMAT
from ling_pretrain.config import compose
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.resume import candidates, check_resume, describe_resume
from ling_pretrain.jobs.validate import validate
from ling_pretrain.optim.mcore import scheduler_kwargs

BASE = [
    "+model=ling_tiny",
    "data=mock",
    "data.seq_length=32",
    "trainer.params_dtype=fp32",
    "optimizer.lr=1e-3",
    "optimizer.min_lr=1e-4",
    "optimizer.lr_decay_style=cosine",
    "optimizer.lr_warmup_steps=0",
]
SCHEDULER_STATE = (
    "max_lr",
    "lr_warmup_steps",
    "lr_decay_style",
    "lr_decay_steps",
    "min_lr",
    "start_wd",
    "end_wd",
    "wd_incr_style",
    "wd_incr_steps",
)


def _cfg(run, *overrides):
    return compose([*BASE, f"run.output_dir={run}", *overrides])


def _checkpoint(save_dir, step, *overrides, weights_only=False, scheduler=None):
    """A checkpoint's config.yaml and train_state.json as a run with ``overrides`` writes them
    (the tensors are not needed to decide)."""
    cfg = _cfg(save_dir.parent, f"trainer.max_steps={step}", *overrides)
    ckpt = save_dir / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    kwargs = scheduler_kwargs(cfg)
    state = {"step": step, "format": FORMAT, "weights_only": weights_only}
    if not weights_only:
        state["scheduler"] = {k: kwargs[k] for k in SCHEDULER_STATE} | {"num_steps": step}
        state["scheduler"].update(scheduler or {})
    (ckpt / "train_state.json").write_text(json.dumps(state))
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return ckpt


def _problems(cfg) -> list[str]:
    errors: list[str] = []
    check_resume(cfg, errors)
    return errors


def test_the_newest_checkpoint_wins_and_the_runs_own_on_a_tie(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    _checkpoint(run / "checkpoints", 3)
    for step in (2, 5):
        _checkpoint(other / "checkpoints", step)
    pick = candidates(_cfg(run, f"checkpoint.load_dir={other / 'checkpoints'}"))
    assert [(c.path.name, c.own) for c in pick] == [
        ("iter_0000005", False),
        ("iter_0000003", True),
        ("iter_0000002", False),
    ]
    # load_dir is where a run starts, not where it stays: a requeued job that still names
    # it goes on from its own newer checkpoint.
    start = other / "checkpoints" / "iter_0000002"
    assert candidates(_cfg(run, f"checkpoint.load_dir={start}"))[0].path == (
        run / "checkpoints" / "iter_0000003"
    )
    _checkpoint(run / "checkpoints", 2)
    tie = candidates(_cfg(run, f"checkpoint.load_dir={start}"))
    assert [(c.step, c.own) for c in tie] == [(3, True), (2, True), (2, False)]
    assert candidates(_cfg(run, "checkpoint.resume=false")) == []


def test_another_model_is_refused_with_both_ways_out(tmp_path):
    run = tmp_path / "run"
    ckpt = _checkpoint(run / "checkpoints", 4)
    cfg = compose(["+model=llama_tiny", "data=mock", "data.seq_length=32", f"run.output_dir={run}"])
    (problem,) = _problems(cfg)
    assert f"{ckpt} (the run's own save_dir, step 4) holds another model than this run's" in problem
    assert "model.family: 'ling' in the checkpoint, 'llama' now" in problem
    assert "Start a new run with another run.output_dir" in problem
    assert f"checkpoint.init_from={ckpt}" in problem
    # The same through validate(), before any process group (as launch/pretrain.py runs it).
    with pytest.raises(ConfigError, match="holds another model"):
        validate(cfg, world_size=1)

    elsewhere = tmp_path / "new"
    (problem,) = _problems(_cfg(elsewhere, f"checkpoint.load_dir={ckpt}", "model.hidden_size=256"))
    assert "(checkpoint.load_dir, step 4) holds another model" in problem
    assert "model.hidden_size: 128 in the checkpoint, 256 now" in problem
    assert "Point checkpoint.load_dir at a checkpoint of this model" in problem
    (problem,) = _problems(_cfg(elsewhere, f"checkpoint.init_from={ckpt}", "model.num_layers=2"))
    assert problem.startswith(f"checkpoint.init_from={ckpt} holds another model")
    assert "model.num_layers: 4 in the checkpoint, 2 now" in problem


def test_a_changed_schedule_needs_a_choice_and_the_choice_is_told(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints", 4)
    (problem,) = _problems(_cfg(run, "trainer.max_steps=8"))
    assert (
        "decay steps (optimizer.lr_decay_steps is null, so trainer.max_steps=8 sets them; the "
        "checkpoint's run had trainer.max_steps=4): 4 in the checkpoint, 8 now"
    ) in problem
    assert "checkpoint.override_scheduler=true (this config's values win from step 4 on)" in problem
    assert "checkpoint.use_checkpoint_scheduler=true (the checkpoint's values win" in problem
    assert "or start a new run with another run.output_dir" in problem
    fixed = tmp_path / "fixed"
    _checkpoint(fixed / "checkpoints", 2, "optimizer.lr_decay_steps=4")
    lr = _cfg(fixed, "trainer.max_steps=4", "optimizer.lr_decay_steps=4", "optimizer.lr=2e-3")
    (problem,) = _problems(lr)
    assert "optimizer.lr: 0.001 in the checkpoint, 0.002 now" in problem
    assert "decay steps" not in problem  # an explicit decay length: max_steps does not count

    override = _cfg(run, "trainer.max_steps=8", "checkpoint.override_scheduler=true")
    assert _problems(override) == []
    (told,) = describe_resume(override, candidates(override)[0])
    assert told.startswith("checkpoint.override_scheduler=true: this config's learning-rate")
    assert "4 in the checkpoint, 8 now" in told
    keep = _cfg(run, "trainer.max_steps=8", "checkpoint.use_checkpoint_scheduler=true")
    assert _problems(keep) == []
    (told,) = describe_resume(keep, candidates(keep)[0])
    assert "the checkpoint's learning-rate schedule wins" in told
    both = _cfg(
        run,
        "trainer.max_steps=8",
        "checkpoint.override_scheduler=true",
        "checkpoint.use_checkpoint_scheduler=true",
    )
    assert any("exclude each other" in p for p in _problems(both))


def test_the_schedule_compared_is_the_one_the_checkpoint_followed(tmp_path):
    """A run that kept the checkpoint's schedule saved config max_steps=8 but decayed over 4:
    resuming it without a choice is asked again, not silently switched to 8."""
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints", 6, scheduler={"lr_decay_steps": 4})
    (problem,) = _problems(_cfg(run, "trainer.max_steps=8"))
    assert "4 in the checkpoint, 8 now" in problem


def test_what_changes_freely(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints", 4, "optimizer.lr_decay_style=constant")
    # Constant LR: a longer run changes no learning rate; the layout may change.
    cfg = _cfg(
        run,
        "optimizer.lr_decay_style=constant",
        "trainer.max_steps=8",
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "trainer.micro_batch_size=4",
        "checkpoint.keep_last=3",
    )
    assert _problems(cfg) == []
    assert describe_resume(cfg, candidates(cfg)[0]) == []
    # Other fields are allowed and told.
    seeded = _cfg(run, "optimizer.lr_decay_style=constant", "trainer.seed=7", "fp8=blockwise")
    (told,) = describe_resume(seeded, candidates(seeded)[0])
    assert "trainer.seed: 1234 in the checkpoint, 7 now" in told
    assert "fp8.recipe: 'bf16' in the checkpoint, 'blockwise' now" in told
    # Already past max_steps: nothing will be scheduled, so nothing to compare.
    assert _problems(_cfg(run, "trainer.max_steps=2")) == []


def test_a_weights_only_checkpoint_is_checked_for_its_model_only(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints", 0, weights_only=True)
    assert _problems(_cfg(run, "trainer.max_steps=50", "optimizer.lr=5e-3")) == []
    (problem,) = _problems(_cfg(run, "model.num_moe_experts=4"))
    assert "model.num_moe_experts: 8 in the checkpoint, 4 now" in problem


def test_bad_checkpoint_fields_are_refused(tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    (problem,) = _problems(_cfg(run, f"checkpoint.load_dir={empty}"))
    assert problem.startswith(f"checkpoint.load_dir={empty} holds no complete checkpoint")
    (problem,) = _problems(_cfg(run, "checkpoint.on_damaged=ignore"))
    assert "checkpoint.on_damaged='ignore' must be 'fallback'" in problem
