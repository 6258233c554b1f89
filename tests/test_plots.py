"""The training-curve plot of a run (tunecomp.plots), on logs written the way train() writes them."""

import json

import matplotlib.image
import pytest

from tunecomp.cli import main
from tunecomp.plots import plot_training, read_log


def _step(step, loss, **extra):
    record = {"step": step, "epoch": 0, "loss": loss, "task_loss": loss * 0.9, "train_accuracy": 0.5,
              "alpha": max(0.0, 1 - step / 4), "rho": 0.1 * step, "lambda": 0.01 / step,
              "lr": 1e-3, "sparsity": 0.08 * step, "seconds": float(step)}
    return record | extra


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_read_log_keeps_the_latest_record_of_a_step_and_skips_a_cut_off_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [_step(1, 2.0), _step(2, 1.5), _step(3, 1.2),
               {"step": 3, "epoch": 0, "eval_accuracy": 0.4},
               # killed after step 3, resumed from the checkpoint of step 2: steps 3-4 again
               _step(3, 1.1), {"step": 3, "epoch": 0, "eval_accuracy": 0.45},
               {"step": 4, "event": "teacher_dropped", "bytes_before": 10, "bytes_after": 5},
               _step(4, 0.9),
               # killed after step 4, resumed from the checkpoint of step 3: the teacher is
               # dropped again at step 4
               {"step": 4, "event": "teacher_dropped", "bytes_before": 11, "bytes_after": 5}]
    _write(log, records, tail='{"step": 5, "epoch": 0, "lo')
    steps, evals, events = read_log(str(log))
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 2.0), (2, 1.5), (3, 1.1), (4, 0.9)]
    assert [(r["step"], r["eval_accuracy"]) for r in evals] == [(3, 0.45)]
    assert [(e["event"], e["bytes_before"]) for e in events] == [("teacher_dropped", 11)]


def test_read_log_skips_cut_off_records_with_a_warning(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log at .*log.jsonl"):
        read_log(str(tmp_path / "log.jsonl"))
    log = tmp_path / "log.jsonl"
    # line 2: a record cut off by a kill; line 3: one cut off, then the resumed run's record
    # glued to it (a log written before resumes ended a cut-off line)
    _write(log, [_step(1, 2.0)], tail='{"step": 2, "lo\n{"step": 2, "lo' + json.dumps(_step(2, 1.0)) + "\n")
    with pytest.warns(UserWarning, match=r"log.jsonl: skipped what is not a JSON record with a step on line\(s\) \[2, 3\]"):
        steps, _, _ = read_log(str(log))
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 2.0), (2, 1.0)]
    # whole JSON lines, but not records of a run: no step, or not an integer one (a KeyError before)
    _write(log, [_step(1, 2.0), {"loss": 2.0}, {"step": "3", "loss": 1.0}, [4], _step(2, 1.0)])
    with pytest.warns(UserWarning, match=r"on line\(s\) \[2, 3, 4\]"):
        steps, _, _ = read_log(str(log))
    assert [r["step"] for r in steps] == [1, 2]
    _write(log, [])
    with pytest.raises(ValueError, match="has no training records yet"):
        plot_training(str(tmp_path))


def test_plot_training_writes_an_image_of_the_run(tmp_path):
    records = [_step(s, 3.0 / s) for s in range(1, 9)]
    records.insert(4, {"step": 4, "event": "teacher_dropped", "bytes_before": 10, "bytes_after": 5})
    records += [{"step": 4, "epoch": 0, "eval_accuracy": 0.6}, {"step": 8, "epoch": 1, "eval_accuracy": 0.7}]
    records.append(_step(9, float("nan")))  # a diverged step must not break the drawing
    _write(tmp_path / "log.jsonl", records)
    path = plot_training(str(tmp_path))
    assert path == str(tmp_path / "training.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0  # drawn, not blank

    # the command line, with an explicit output path, in the format its name says
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "curves.png").shape == image.shape
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.pdf")]) == 0
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match=f"the image's folder {tmp_path / 'missing'} does not exist"):
        plot_training(str(tmp_path), str(tmp_path / "missing" / "curves.png"))


def test_plotting_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    _write(tmp_path / "log.jsonl", [_step(s, 1.0 / s) for s in range(1, 4)])
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a backend the caller chose, other than the Agg a library might force
    try:
        plot_training(str(tmp_path))
        assert matplotlib.get_backend().lower() == "pdf"
    finally:
        matplotlib.use(before)


def test_plots_of_one_run_at_the_same_time(tmp_path):
    """`tunecomp plot` on a run in progress can overlap the run's own plot: each writes its
    own temporary file. With a shared `training.png.tmp`, 2 processes x 25 plots saw 7-12
    fail (one moved or removed the other's file)."""
    import subprocess
    import sys

    _write(tmp_path / "log.jsonl", [_step(s, 3.0 / s) for s in range(1, 6)])
    code = ("import sys; from tunecomp.plots import plot_training\n"
            "for _ in range(8): plot_training(sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert matplotlib.image.imread(tmp_path / "training.png").shape[-1] in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "training.png"]  # no temporary left
