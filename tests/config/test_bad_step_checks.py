"""The bad-step fields of ``trainer`` are checked before any work, naming field and fix."""

from __future__ import annotations

import pytest

from ling_pretrain.config import compose
from ling_pretrain.config.checks import check_trainer
from ling_pretrain.core.errors import ConfigError
from ling_pretrain.jobs.validate import Hardware, validate
from ling_pretrain.memory.breakdown import GIB


def _problems(*overrides: str) -> list[str]:
    errors: list[str] = []
    check_trainer(compose(["+model=ling_tiny", "data=mock", *overrides]), errors)
    return errors


def test_defaults_and_off_are_valid():
    assert _problems() == []
    assert _problems("trainer.loss_spike_sigma=null") == []


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.loss_spike_sigma=0", "trainer.loss_spike_sigma=0.0 must be > 0"),
        ("trainer.loss_spike_window=1", "trainer.loss_spike_window=1 must be >= 2"),
        ("trainer.loss_spike_warmup=200", "trainer.loss_spike_warmup=200 must be between 2"),
        ("trainer.max_consecutive_bad_steps=0", "max_consecutive_bad_steps=0 must be >= 1"),
        ("trainer.inject_nan_grad_steps=[0,3]", "steps are numbered from 1, so [0] never"),
        ("trainer.inject_loss_spike_steps=[-2]", "steps are numbered from 1, so [-2] never"),
    ],
)
def test_bad_values_are_refused(override, message):
    problems = _problems(override)
    assert any(message in p for p in problems), problems


def test_validate_refuses_them_before_any_process_group():
    cfg = compose(["+model=ling_tiny", "data=mock", "trainer.max_consecutive_bad_steps=-1"])
    with pytest.raises(ConfigError, match="max_consecutive_bad_steps=-1"):
        validate(cfg, 1, Hardware("cpu", 24 * GIB, has_transformer_engine=False))
