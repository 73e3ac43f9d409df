"""With --max-time, the cosine schedule is fitted to the time: it reaches its end when the time runs out."""

from __future__ import annotations

import pytest

from neurallm.training.optim import TIMING_SHARE, Schedule


def _schedule() -> Schedule:
    return Schedule("adamw", 1e-3, warmup=10, total_steps=100_000)


def test_the_length_is_fitted_once_from_the_measured_speed():
    schedule = _schedule()
    schedule.step = 100
    schedule.fit_to_time(elapsed=TIMING_SHARE * 110 - 0.1, max_time=110)  # still measuring
    assert schedule.total_steps == 100_000 and schedule.fitted_to is None
    schedule.fit_to_time(elapsed=11.0, max_time=110)  # 100 steps in 11 s: 900 more fit in the 99 s left
    assert schedule.total_steps == 1000 and schedule.fitted_to == 110
    schedule.step = 500
    schedule.fit_to_time(elapsed=50.0, max_time=110)  # fixed once: a slower stretch does not move the end
    assert schedule.total_steps == 1000
    schedule.step = 999
    schedule.after_step()
    assert schedule.lr == pytest.approx(1e-4)  # annealed to its floor when the time runs out


def test_the_fitted_length_never_exceeds_the_epochs():
    schedule = Schedule("adamw", 1e-3, warmup=10, total_steps=500)
    schedule.step = 100
    schedule.fit_to_time(elapsed=11.0, max_time=110)
    assert schedule.total_steps == 500


def test_resume_keeps_the_fitted_length_for_the_same_limit_and_refits_for_a_new_one():
    schedule = _schedule()
    schedule.step = 100
    schedule.fit_to_time(elapsed=11.0, max_time=110)
    same = Schedule.from_dict(schedule.to_dict())
    same.resumed(100_000, 110)
    assert same.total_steps == 1000  # an exact resume
    raised = Schedule.from_dict(schedule.to_dict())
    raised.resumed(100_000, 300)
    assert raised.total_steps == 100_000 and raised.fitted_to is None  # fitted again to the new limit


def test_sgd_schedules_are_not_fitted():
    schedule = Schedule("sgd", 20.0, warmup=0, total_steps=100_000)
    schedule.step = 100
    schedule.fit_to_time(elapsed=11.0, max_time=110)
    assert schedule.total_steps == 100_000
