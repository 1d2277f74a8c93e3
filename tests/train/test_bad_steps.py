"""The bad-step policy on its own: spike statistics, verdicts, the count, the saved state."""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest

from ling_pretrain.train.bad_steps import (
    LOSS_SPIKE,
    NON_FINITE_GRAD,
    NON_FINITE_LOSS,
    BadStepPolicy,
    inject,
)


def _trainer(**kw):
    base = dict(
        loss_spike_sigma=3.0,
        loss_spike_window=5,
        loss_spike_warmup=3,
        max_consecutive_bad_steps=2,
        inject_nan_grad_steps=[],
        inject_loss_spike_steps=[],
    )
    return SimpleNamespace(**(base | kw))


LOSSES = [2.31, 2.29, 2.35, 2.27, 2.33, 2.30, 2.28]


def test_statistics_are_mean_and_sample_std_of_the_last_window_good_steps():
    policy = BadStepPolicy(_trainer())
    policy.update(LOSSES[0], None)
    policy.update(LOSSES[1], None)
    assert policy.statistics() is None and policy.threshold() is None  # warm-up: 2 < 3
    for loss in LOSSES[2:]:
        policy.update(loss, None)
    window = LOSSES[-5:]
    mean, std = policy.statistics()
    assert mean == pytest.approx(statistics.fmean(window), abs=1e-15)
    assert std == pytest.approx(statistics.stdev(window), abs=1e-15)
    assert policy.threshold() == pytest.approx(mean + 3.0 * std, abs=1e-15)


def test_bad_steps_do_not_enter_the_window():
    policy = BadStepPolicy(_trainer(max_consecutive_bad_steps=10))
    for loss in LOSSES[:4]:
        policy.update(loss, None)
    before = policy.statistics()
    policy.update(9.0, "loss spike")
    policy.update(math.nan, "non-finite loss (nan)")
    assert policy.statistics() == before
    assert (policy.in_a_row, policy.total) == (2, 2)
    policy.update(2.3, None)
    assert (policy.in_a_row, policy.total) == (0, 2)


def test_classify_orders_non_finite_before_spikes():
    policy = BadStepPolicy(_trainer())
    for loss in LOSSES:
        policy.update(loss, None)
    limit = policy.threshold()
    assert policy.classify(limit - 1e-9, 1.0) == 0
    assert policy.classify(limit + 1e-9, 1.0) == LOSS_SPIKE
    assert policy.classify(2.3, math.inf) == NON_FINITE_GRAD
    assert policy.classify(math.nan, math.nan) == NON_FINITE_LOSS
    assert policy.classify(2.3, math.nan) == NON_FINITE_GRAD
    reason = policy.describe(LOSS_SPIKE, 2.5, 1.0)
    assert reason.startswith("loss spike: 2.5000 > ") and "of the last 5 good steps" in reason


def test_spike_detection_can_be_turned_off():
    policy = BadStepPolicy(_trainer(loss_spike_sigma=None))
    for loss in LOSSES:
        policy.update(loss, None)
    assert policy.threshold() is None
    assert policy.classify(1e6, 1.0) == 0
    assert policy.classify(math.inf, 1.0) == NON_FINITE_LOSS


def test_stop_after_max_consecutive_bad_steps():
    policy = BadStepPolicy(_trainer(max_consecutive_bad_steps=2))
    policy.update(2.3, "x")
    assert not policy.must_stop()
    policy.update(2.3, None)
    policy.update(2.3, "x")
    assert not policy.must_stop()
    policy.update(2.3, "y")
    assert policy.must_stop() and policy.last_reason == "y"


def test_state_round_trips_through_json_exactly():
    policy = BadStepPolicy(_trainer())
    for loss in [2.3123456789012345, 2.2999999999999998, 2.35]:
        policy.update(loss, None)
    policy.update(7.0, "spike")
    again = BadStepPolicy(_trainer(), json.loads(json.dumps(policy.state_dict())))
    assert again.state_dict() == policy.state_dict()
    assert again.statistics() == policy.statistics()


def test_injection_names_steps_and_ranks():
    t = _trainer(inject_nan_grad_steps=[3], inject_loss_spike_steps=[5])
    assert inject(t, 3, is_last_dp_rank=True) == "nan_grad"
    assert inject(t, 3, is_last_dp_rank=False) is None
    assert inject(t, 5, is_last_dp_rank=False) == "spike"
    assert inject(t, 4, is_last_dp_rank=True) is None
