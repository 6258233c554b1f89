"""pytest plumbing of the kernel benchmarks (``python -m pytest benchmarks/``).

- Collects ``bench_*.py`` here. The repo's ``testpaths = ["tests"]`` keeps ``make test`` from
  ever reaching this folder; benchmarks run only when this folder is named.
- Keeps one run record (a dict) per session that the suite fills in and that is written into
  the pytest-benchmark JSON under ``"tunecomp"``: device, versions, grid, what was skipped and
  why. ``benchmarks/report.py`` needs it to say what a results table does not contain.
- Enforces an optional time budget (``TUNECOMP_BENCH_BUDGET_S``): once spent, the remaining
  cases are skipped (and listed as such) rather than having the whole run killed, which would
  lose every measurement already taken.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from tunecomp.provenance import device_name, versions

_RUN = pytest.StashKey[dict]()


def pytest_collect_file(file_path, parent):
    # Paths named on the command line are collected by pytest itself; don't collect them twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    budget = os.environ.get("TUNECOMP_BENCH_BUDGET_S")
    config.stash[_RUN] = {
        "started": time.monotonic(),
        "budget_s": float(budget) if budget else None,
        # Cases (tests parametrized as "case") that produced no measurement, and why.
        "skipped": [],  # {"case": {...}, "reason": str}
        "failed": [],  # {"case": {...}, "error": str}
    }


@pytest.fixture(scope="session")
def bench_run(pytestconfig) -> dict:
    """The session's run record; the suite adds grid, dtype, impls, unavailable backends."""
    return pytestconfig.stash[_RUN]


@pytest.fixture
def within_budget(bench_run):
    """Skips the case when the session's time budget is spent."""
    budget = bench_run["budget_s"]
    elapsed = time.monotonic() - bench_run["started"]
    if budget is not None and elapsed > budget:
        pytest.skip(f"time budget spent (TUNECOMP_BENCH_BUDGET_S={budget:g})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if not hasattr(case, "as_dict") or report.when == "teardown":
        return
    run = item.config.stash[_RUN]
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        run["skipped"].append({"case": case.as_dict(), "reason": reason.removeprefix("Skipped: ")})
    elif report.failed:
        error = call.excinfo.exconly().splitlines()[0][:300] if call.excinfo else "failed"
        run["failed"].append({"case": case.as_dict(), "error": error})


def _versions() -> dict:
    found = versions()
    try:
        import pytest_benchmark

        found["pytest_benchmark"] = pytest_benchmark.__version__
    except Exception:  # noqa: BLE001
        pass
    return found


def pytest_benchmark_update_json(config, benchmarks, output_json):
    run = dict(config.stash[_RUN])
    run["elapsed_s"] = round(time.monotonic() - run.pop("started"), 1)
    run["device_name"] = device_name("cuda" if torch.cuda.is_available() else "cpu")
    run["versions"] = _versions()
    output_json["tunecomp"] = run
