"""With --max-time, the cosine schedule follows the training clock: it reaches its end when the time runs out,
however the speed varies on the way."""

from __future__ import annotations

import math

import pytest

from neurallm.training.optim import Schedule


def _schedule(total_steps: int = 100_000) -> Schedule:
    return Schedule("adamw", 1e-3, warmup=10, total_steps=total_steps)


def _cosine(progress: float) -> float:
    return 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _run(schedule: Schedule, seconds_per_step: list[float], time_limit: float | None) -> list[float]:
    """Step the schedule with the given step durations; the learning rate after each step."""
    rates = []
    for seconds in seconds_per_step:
        schedule.after_step(schedule.elapsed + seconds, time_limit)
        rates.append(schedule.lr)
    return rates


def test_after_the_warmup_the_cosine_is_the_share_of_the_remaining_time_spent():
    schedule = _schedule()
    _run(schedule, [1.0] * 10, time_limit=110)  # warm-up ends at 10 s
    assert schedule.warmup_end_time == 10.0
    _run(schedule, [5.0] * 10, time_limit=110)  # 60 s: half of the 100 s after the warm-up
    assert schedule.lr == pytest.approx(_cosine(0.5))


def test_a_slow_start_does_not_end_the_schedule_early():
    """The speed of the first stretch says nothing about the rest: only the clock counts."""
    schedule = _schedule()
    _run(schedule, [1.0] * 10 + [3.0] * 10, time_limit=110)  # slow: 40 s, 30 of the 100 after the warm-up
    assert schedule.lr == pytest.approx(_cosine(0.3))
    rates = _run(schedule, [0.1] * 700, time_limit=110)  # then ten times faster until the time is up
    assert rates[-1] == pytest.approx(1e-4)  # annealed to its floor exactly when the time runs out
    assert rates[-2] > 1e-4


def test_the_epochs_end_the_schedule_if_they_come_first():
    schedule = _schedule(total_steps=110)
    _run(schedule, [0.1] * 110, time_limit=1000)
    assert schedule.lr == pytest.approx(1e-4)


def test_resume_continues_the_clock_and_a_raised_limit_stretches_the_rest():
    schedule = _schedule()
    _run(schedule, [1.0] * 60, time_limit=110)  # 60 s: half way
    same = Schedule.from_dict(schedule.to_dict())
    same.resumed(100_000, 110)
    assert same.lr == schedule.lr and same.elapsed == 60.0
    _run(same, [1.0], time_limit=110)
    assert same.lr == pytest.approx(_cosine(51 / 100))
    raised = Schedule.from_dict(schedule.to_dict())
    raised.resumed(100_000, 210)
    _run(raised, [1.0], time_limit=210)
    assert raised.lr == pytest.approx(_cosine(51 / 200))


def test_a_checkpoint_from_the_fitted_schedule_still_loads():
    data = {**_schedule().to_dict(), "fitted_to": 110.0}
    data.pop("time_limit"), data.pop("elapsed"), data.pop("warmup_end_time"), data.pop("min_lr_ratio")
    loaded = Schedule.from_dict(data)
    assert loaded.time_limit is None and loaded.min_lr_ratio == 0.1  # the floor every older run annealed to


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5])
def test_the_cosine_ends_at_min_lr_ratio_of_the_rate_by_the_clock_or_the_epochs(ratio):
    by_clock = Schedule("adamw", 1e-3, warmup=10, total_steps=100_000, min_lr_ratio=ratio)
    rates = _run(by_clock, [1.0] * 10 + [0.5] * 200, time_limit=110)
    assert rates[-1] == pytest.approx(1e-3 * ratio) and rates[-2] > rates[-1]
    assert rates[10 + 99] == pytest.approx(1e-3 * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * 0.5))))
    by_epochs = Schedule("adamw", 1e-3, warmup=10, total_steps=110, min_lr_ratio=ratio)
    assert _run(by_epochs, [0.1] * 110, time_limit=None)[-1] == pytest.approx(1e-3 * ratio)
    assert Schedule.from_dict(by_epochs.to_dict()).min_lr_ratio == ratio  # a resumed run keeps its floor


def test_sgd_schedules_do_not_follow_the_clock():
    schedule = Schedule("sgd", 20.0, warmup=0, total_steps=100_000)
    _run(schedule, [1.0] * 100, time_limit=110)
    assert schedule.lr == 20.0
