import math

import pytest

from tunecomp import schedule
from tunecomp.reference import student_scale


def test_alpha_shape():
    T = 100
    assert schedule.alpha(0, T) == 1.0
    assert schedule.alpha(T, T) == 0.0 and schedule.alpha(T + 7, T) == 0.0
    assert schedule.alpha(50, T) == pytest.approx(1 - math.sin(math.pi / 4))
    values = [schedule.alpha(t, T) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone
    assert schedule.alpha(5, 0) == 0.0  # no distillation: student from the start
    assert schedule.alpha(-1, T) == 1.0  # before the start: the teacher alone, as at 0
    for a in values:
        assert a**2 + student_scale(a) ** 2 == pytest.approx(1.0)


def test_prune_ratio_cubic_ramp():
    assert schedule.prune_ratio(0, 0.9, 10, 110) == 0.0
    assert schedule.prune_ratio(10, 0.9, 10, 110) == 0.0
    assert schedule.prune_ratio(60, 0.9, 10, 110) == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule.prune_ratio(110, 0.9, 10, 110) == pytest.approx(0.9)
    assert schedule.prune_ratio(500, 0.9, 10, 110) == pytest.approx(0.9)
    assert schedule.prune_ratio(3, 0.5, 5, 5) == 0.0 and schedule.prune_ratio(5, 0.5, 5, 5) == 0.5
    assert schedule.prune_ratio(5, 0.0, 0, 10) == 0.0  # no pruning: a ratio of 0 is a valid target
    with pytest.raises(ValueError, match=r"target pruning ratio must be in \[0, 1\)"):
        schedule.prune_ratio(0, 1.0, 0, 1)


def test_reg_weight_decays_to_zero():
    assert schedule.reg_weight(0, 1e-3, 100) == 1e-3
    assert schedule.reg_weight(50, 1e-3, 100) == pytest.approx(5e-4)
    assert schedule.reg_weight(100, 1e-3, 100) == 0.0 and schedule.reg_weight(200, 1e-3, 100) == 0.0


def test_schedule_bundle():
    s = schedule.Schedule(decay_steps=10, prune_target=0.5, prune_start=0, prune_end=10, reg_initial=1.0, reg_end=10)
    assert s.at(0) == (1.0, 0.0, 1.0)
    a, rho, lam = s.at(10)
    assert (a, lam) == (0.0, 0.0) and rho == pytest.approx(0.5)
