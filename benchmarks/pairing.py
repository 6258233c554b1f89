"""Paired timing, for ratios that hold on a machine whose load drifts (a shared CI runner).

Timing a backend and its baseline as separate cases, minutes apart, lets the machine's load
move their ratio: on a shared 2-core machine, by up to 25% between runs. Paired, each timed
round of the case is preceded by one round of each baseline, and a ratio is the median over
rounds of (baseline round / the case's round right after it): rounds taken seconds apart.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def pedantic_paired(benchmark, target: Callable[[], None], baselines: dict, *, rounds: int,
                    warmup_rounds: int = 0, calls: int = 1) -> dict:
    """``benchmark.pedantic(target)``, ``rounds`` rounds of one call, each round (warm-up ones
    included) preceded by one round of each baseline, run and timed in pytest-benchmark's
    untimed ``setup``.

    ``baselines``: {name: (run, calls)}, a round of the baseline and the calls it makes;
    ``calls``: the calls one ``target()`` makes. Returns {name: {"median_s", "speedup"}}: the
    baseline's median time per call and the median over the timed rounds of (baseline per call
    / target per call). Without baselines: plain ``pedantic``, returns {}."""
    if not baselines:
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
        return {}
    own: list = []
    seconds = {name: [] for name in baselines}

    def setup():
        for name, (run, n) in baselines.items():
            start = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - start) / n)

    def timed():
        start = time.perf_counter()
        target()
        own.append((time.perf_counter() - start) / calls)

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds, setup=setup)
    result = {}
    for name, times in seconds.items():
        pairs = list(zip(times, own))
        pairs = pairs[warmup_rounds:] or pairs  # with --benchmark-disable: one round, kept
        result[name] = {"median_s": statistics.median(b for b, _ in pairs),
                        "speedup": statistics.median(b / t for b, t in pairs)}
    return result
