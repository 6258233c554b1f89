"""The schedules of the joint loop, as pure functions of the optimisation step.

- ``alpha(t, T)``: the teacher's weight in each layer's blend, ``1 − sin(π·t / 2T)`` for
  ``t ≤ T`` and 0 after. It leaves 1 with slope −π/2T and reaches 0 with zero slope (the
  teacher fades out gently); the student's weight is ``sqrt(1 − alpha²)``
  (``reference.student_scale``), so the two weights stay on the unit circle and the output's
  scale is kept for uncorrelated branches.
- ``prune_ratio(t, target, start, end)``: the fraction of factor entries pruned at step t,
  the cubic ramp of Zhu & Gupta (2017): ``target·(1 − (1 − p)³)`` with ``p`` the progress
  from ``start`` to ``end``. It prunes fast while many redundant weights remain, slowly near
  the target.
- ``reg_weight(t, initial, end)``: the weight λ of the sparsity regulariser, decaying
  linearly from ``initial`` to 0 at ``end``: a strong pull towards sparsity early, none once
  the masks are final, so the last steps fine-tune without bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _progress(step: int, start: int, end: int) -> float:
    """Where ``step`` lies in [start, end], clamped to [0, 1] (1 when end <= start)."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def alpha(step: int, decay_steps: int) -> float:
    """``1 − sin(π·t / 2T)`` for ``t ≤ T``, else 0 (T = ``decay_steps``; T = 0: always 0)."""
    if decay_steps <= 0 or step >= decay_steps:
        return 0.0
    return 1.0 - math.sin(math.pi * max(step, 0) / (2 * decay_steps))


def prune_ratio(step: int, target: float, start: int, end: int) -> float:
    """Cubic ramp from 0 at ``start`` to ``target`` at ``end`` (Zhu & Gupta)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target pruning ratio must be in [0, 1); got {target}")
    return target * (1.0 - (1.0 - _progress(step, start, end)) ** 3)


def reg_weight(step: int, initial: float, end: int) -> float:
    """Linear decay of the regularisation weight from ``initial`` at step 0 to 0 at ``end``."""
    return initial * (1.0 - _progress(step, 0, end))


@dataclass(frozen=True)
class Schedule:
    """All three schedules of one run.

    decay_steps: T of alpha (distillation length). prune_target: final ratio ρ.
    prune_start/prune_end: the steps over which ρ ramps up. reg_initial/reg_end: λ's start
    value and the step where it reaches 0.
    """

    decay_steps: int
    prune_target: float = 0.0
    prune_start: int = 0
    prune_end: int = 0
    reg_initial: float = 0.0
    reg_end: int = 0

    def at(self, step: int) -> tuple:
        """``(alpha, rho, lam)`` at ``step``."""
        return (
            alpha(step, self.decay_steps),
            prune_ratio(step, self.prune_target, self.prune_start, self.prune_end),
            reg_weight(step, self.reg_initial, self.reg_end),
        )
