"""The training curves of a ``compress`` run, drawn from its ``log.jsonl``.

    tunecomp plot runs/x            # -> runs/x/training.png (also works while the run goes on)

Four panels over optimiser steps: the losses, train and evaluation accuracy, the TuneComp
schedule (the teacher's share α, the pruning target ρ, the factor sparsity reached and the
regulariser's weight λ over its largest value) and the learning rate. A dotted line marks the
step at which the teacher weights were freed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings

from .train import LOG

PLOT = "training.png"


def read_log(path: str) -> tuple:
    """``(steps, evals, events)``: the training records, the evaluations and the events
    (``teacher_dropped``) of a run's log, each sorted by step.

    A resumed run logs again the steps after its last checkpoint: the latest record of a step
    (and of an event at a step) wins. A run killed while writing leaves a cut-off record: on
    the last line it is ignored (the line may still be being written); elsewhere it is skipped
    with a warning, and a record that follows it on the same line (a log written before
    resumes ended the cut-off line) is read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no training log at {path} (a `tunecomp compress` run writes {LOG})")
    with open(path) as f:
        lines = f.read().split("\n")
    steps, evals, events, skipped = {}, {}, {}, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record, complete = _parse(line)
        step = None if record is None else record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):  # JSON, but none of a run's records
            record, complete = None, False
        if not complete and number < len(lines):  # the last line may still be being written
            skipped.append(number)
        if record is None:
            continue
        if "event" in record:
            events[record.get("step"), record["event"]] = record
        elif "eval_accuracy" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            steps[record["step"]] = record
    if skipped:
        warnings.warn(f"{path}: skipped what is not a JSON record with a step on line(s) {skipped} "
                      "(a run killed while writing?)", stacklevel=2)
    by_step = lambda records: sorted(records, key=lambda r: r["step"])  # noqa: E731
    return by_step(steps.values()), by_step(evals.values()), by_step(events.values())


def _parse(line: str) -> tuple:
    """``(record or None, whether the whole line was one record)``. Records are flat JSON
    objects, so one glued after a cut-off one starts at the line's last ``{``."""
    try:
        record = json.loads(line)
        if isinstance(record, dict):
            return record, True
    except json.JSONDecodeError:
        pass
    start = line.rfind("{")
    try:
        record = json.loads(line[start:]) if start > 0 else None
    except json.JSONDecodeError:
        record = None
    return (record if isinstance(record, dict) else None), False


def plot_training(run_dir: str, out: str | None = None) -> str:
    """Draws the run's training curves into ``out`` (default ``run_dir/training.png``) and
    returns its path."""
    if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"the image's folder {os.path.dirname(os.path.abspath(out))} does not exist "
                                f"(out={out!r})")
    steps, evals, events = read_log(os.path.join(run_dir, LOG))
    if not steps and not evals:
        raise ValueError(f"{os.path.join(run_dir, LOG)} has no training records yet")
    # A Figure of its own, not pyplot: no global state, and the caller's backend is untouched.
    from matplotlib.figure import Figure

    def series(records, key):
        pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    fig = Figure(figsize=(10, 6.4))
    axes = fig.subplots(2, 2, sharex=True)
    (loss_ax, acc_ax), (sched_ax, lr_ax) = axes

    x, y = series(steps, "loss")
    loss_ax.plot(x, y, label="loss (optimised)")
    x, task = series(steps, "task_loss")
    if task != y:  # with distillation or the regulariser, the optimised loss is not the task's
        loss_ax.plot(x, task, label="task loss (cross-entropy)")
    finite = [v for v in y if math.isfinite(v)]  # a diverged run logs NaN or inf
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        loss_ax.set_yscale("log")
    loss_ax.set_title("loss (mean over each logging window)")

    acc_ax.plot(*series(steps, "train_accuracy"), label="train (logging window)")
    x, y = series(evals, "eval_accuracy")
    acc_ax.plot(x, y, "o-", label="evaluation")
    if y:
        acc_ax.annotate(f"{y[-1]:.3f}", (x[-1], y[-1]), textcoords="offset points", xytext=(-10, 6), ha="right")
    acc_ax.set_title("accuracy")

    sched_ax.plot(*series(steps, "alpha"), label="α (teacher's share)")
    sched_ax.plot(*series(steps, "rho"), "--", label="ρ (pruning target)")
    sched_ax.plot(*series(steps, "sparsity"), label="factor sparsity reached")
    x, lam = series(steps, "lambda")
    if any(lam):
        top = max(lam)
        sched_ax.plot(x, [v / top for v in lam], ":", label=f"λ / {top:.3g}")
    sched_ax.set_ylim(-0.03, 1.03)
    sched_ax.set_title("schedule")

    lr_ax.plot(*series(steps, "lr"))
    lr_ax.set_title("learning rate")

    for ax in axes.flat:
        for event in events:
            if event.get("event") == "teacher_dropped":
                ax.axvline(event["step"], color="grey", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimiser step")
    last = steps[-1]["step"] if steps else evals[-1]["step"]
    title = f"{os.path.basename(os.path.abspath(run_dir))}: {last} steps"
    if any(e.get("event") == "teacher_dropped" for e in events):
        title += " (dotted: teacher freed)"
    fig.suptitle(title)
    fig.tight_layout()
    out = out or os.path.join(run_dir, PLOT)
    fmt = os.path.splitext(out)[1][1:].lower() or "png"
    # A temporary name of its own: a plot of a run in progress may overlap the run's own plot.
    handle, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(out)))
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=110, format=fmt)
        os.replace(tmp, out)  # a reader (or a plot of a run in progress) never sees half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
