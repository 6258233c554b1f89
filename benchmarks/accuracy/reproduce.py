"""TuneComp against fine-tune-then-compress pipelines, and TuneComp's pruning-ratio sweep.

    python benchmarks/accuracy/reproduce.py                 # the committed CPU run (~15 min, 2 cores)
    python benchmarks/accuracy/reproduce.py --model vit_base_patch16_224 \\
        --teacher-file vit_b16_in1k.safetensors --dataset cifar100 --data-dir ~/data \\
        --image-size 224 --steps 5000 --device cuda              # the paper's setting, your files

Default setting: the ViT of pretrain_teacher.py (Fashion-MNIST) transferred to scikit-learn's
digits. Every method of tunecomp.baselines runs at each compression level (fraction of the
replaced layers' parameters kept) with each seed; then TuneComp alone over pruning ratios ρ at
factors of a fixed size. Writes into --out: results.json (every run, device, versions, date, command),
results.md (tables, mean ± std over seeds), accuracy_vs_compression.png, accuracy_vs_rho.png.
Never edited by hand.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

import torch

from tunecomp.baselines import METHODS, Budget, run_method
from tunecomp.cli import load_timm_model
from tunecomp.data import load_dataset
from tunecomp.provenance import device_name, versions

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER = os.path.join(HERE, "teacher_fmnist_vit.safetensors")
SMALL_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--model-kwargs", default=json.dumps(SMALL_VIT), help="JSON of timm kwargs")
    p.add_argument("--teacher-file", default=TEACHER, help="pretrained weights (local file)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="total optimiser steps of every method")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--levels", type=_floats, default=[0.5, 0.25],
                   help="fractions of the replaced layers' parameters kept")
    p.add_argument("--rho", type=float, default=0.5, help="pruning ratio of the methods that prune")
    p.add_argument("--sweep", type=_floats, default=[0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95],
                   help="TuneComp pruning ratios, factors at --sweep-param-ratio before pruning")
    p.add_argument("--sweep-param-ratio", type=float, default=0.5,
                   help="the sweep's factors hold this fraction of the dense parameters before pruning")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--readme", default=os.path.join(HERE, "..", "..", "README.md"),
                   help="README whose marked results block to rewrite ('' for none)")
    p.add_argument("--from-json", default=None, help="re-render from this results.json, run nothing")
    return p.parse_args(argv)


def summarise(runs, key):
    groups = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    rows = []
    for k, group in sorted(groups.items()):
        accs = [r["accuracy"] for r in group]
        rows.append({"key": k, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "n": len(accs), "params": statistics.mean(r["effective_params"] for r in group)})
    return rows


def plot(comparison, sweep, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in sorted({r["key"][0] for r in comparison}):
        rows = sorted((r for r in comparison if r["key"][0] == method), key=lambda r: r["params"])
        ax.errorbar([r["params"] / 1e3 for r in rows], [100 * r["mean"] for r in rows],
                    yerr=[100 * r["std"] for r in rows], marker="o", capsize=3, label=method,
                    linewidth=2.5 if method == "tunecomp" else 1.2)
    ax.set_xlabel("parameters after compression (thousands)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs compression (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_compression.png"), dpi=120)
    plt.close(fig)

    if not sweep:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = sorted(sweep, key=lambda r: r["key"])
    ax.errorbar([100 * r["key"] for r in rows], [100 * r["mean"] for r in rows],
                yerr=[100 * r["std"] for r in rows], marker="o", capsize=3, color="C5")
    ax.set_xlabel("pruning ratio ρ of factor entries (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("TuneComp: accuracy vs pruning ratio")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_rho.png"), dpi=120)
    plt.close(fig)


def markdown(meta, comparison, sweep, levels):
    lines = [f"# TuneComp vs sequential pipelines ({meta['dataset']}, {meta['model']})", "",
             f"Generated by `{meta['command']}` on {meta['device']} ({meta['date']}; torch {meta['torch']}, "
             f"tunecomp {meta['tunecomp']}). {meta['steps']} optimiser steps per method, seeds {meta['seeds']}, "
             f"pruning methods at ρ = {meta['rho']}. Never edited by hand.", "",
             "Test accuracy (%), mean ± std over seeds; parameters = unpruned factor entries + untouched parameters.", ""]
    header = "| method | " + " | ".join(f"kept {lvl:g}: acc | params" for lvl in levels) + " |"
    lines += [header, "|---|" + "---|---|" * len(levels)]
    by = {r["key"]: r for r in comparison}
    for method in METHODS:
        cells = []
        for lvl in levels:
            r = by.get((method, lvl))
            cells += ["—", "—"] if r is None else [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}", f"{r['params']:,.0f}"]
        name = f"**{method}**" if method == "tunecomp" else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Where TuneComp stands (mean accuracy minus the best other method at the same level):", ""]
    for lvl in levels:
        ours = by.get(("tunecomp", lvl))
        others = [r for (m, l), r in by.items() if l == lvl and m != "tunecomp"]
        if ours and others:
            best = max(others, key=lambda r: r["mean"])
            lines.append(f"- kept {lvl:g}: {100 * (ours['mean'] - best['mean']):+.1f} points vs {best['key'][0]}")
    if sweep:
        # results.json files written before the key's rename call it sweep_rank_ratio; it was
        # always passed as the factors' parameter ratio
        ratio = meta.get("sweep_param_ratio", meta.get("sweep_rank_ratio"))
        lines += ["", f"## TuneComp pruning sweep (factors at {ratio:g} of the dense parameters before pruning)", "",
                  "| ρ | accuracy (%) | params |", "|---|---|---|"]
        for r in sorted(sweep, key=lambda r: r["key"]):
            lines.append(f"| {r['key']:g} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} | {r['params']:,.0f} |")
    lines += ["", "![accuracy vs compression](accuracy_vs_compression.png)", ""]
    if sweep:
        lines += ["![accuracy vs rho](accuracy_vs_rho.png)", ""]
    return "\n".join(lines)


def render(results, out_dir, readme):
    """results.md, the plots and the README block from a results.json's content."""
    meta = results["meta"]
    comparison = [dict(r, key=tuple(r["key"])) for r in results["comparison"]]
    plot(comparison, results["sweep"], out_dir)
    text = markdown(meta, comparison, results["sweep"], meta["levels"])
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    if readme:
        update_readme(readme, text, os.path.relpath(out_dir, os.path.dirname(os.path.abspath(readme))))
    return text


def main(argv=None):
    args = parse(argv)
    if args.from_json:  # re-render tables, plots and the README from a finished run
        with open(args.from_json) as f:
            print(render(json.load(f), os.path.dirname(os.path.abspath(args.from_json)), args.readme))
        return
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    if not os.path.isfile(args.teacher_file):
        sys.exit(f"--teacher-file {args.teacher_file} not found (benchmarks/accuracy/pretrain_teacher.py makes the default one)")

    def make_model():
        return load_timm_model(args.model, args.teacher_file, num_classes=data.num_classes, **kwargs)

    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    os.makedirs(args.out, exist_ok=True)
    runs, sweep_runs = [], []
    work = os.path.join("runs", "reproduce")
    start = time.perf_counter()
    for level in args.levels:
        for method in methods:
            for seed in seeds:
                budget = Budget(steps=args.steps, level=level, rho=args.rho, lr=args.lr,
                                batch_size=args.batch_size, seed=seed)
                run = run_method(method, make_model, data, budget, os.path.join(work, f"{method}-{level}-{seed}"), args.device)
                runs.append(run)
                print(f"[{time.perf_counter() - start:6.0f}s] kept {level:g} {method:<10} seed {seed}: "
                      f"accuracy {run['accuracy']:.4f}, params {run['effective_params']:,}", flush=True)
    for rho in args.sweep:
        for seed in seeds:
            level = args.sweep_param_ratio * (1 - rho)  # so that Budget.factor_ratio is the sweep's
            budget = Budget(steps=args.steps, level=level, rho=rho, lr=args.lr, batch_size=args.batch_size, seed=seed)
            run = run_method("tunecomp", make_model, data, budget, os.path.join(work, f"sweep-{rho}-{seed}"), args.device)
            sweep_runs.append(run)
            print(f"[{time.perf_counter() - start:6.0f}s] sweep rho {rho:g} seed {seed}: accuracy {run['accuracy']:.4f}", flush=True)
    comparison = summarise(runs, lambda r: (r["method"], r["level"]))
    sweep = summarise(sweep_runs, lambda r: r["rho"])
    meta = {
        "command": "python benchmarks/accuracy/reproduce.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": device_name(args.device), "date": datetime.date.today().isoformat(), **versions(),
        "model": args.model, "model_kwargs": kwargs, "dataset": args.dataset, "teacher_file": os.path.basename(args.teacher_file),
        "steps": args.steps, "seeds": seeds, "rho": args.rho, "levels": args.levels,
        "sweep_param_ratio": args.sweep_param_ratio, "seconds": time.perf_counter() - start,
    }
    results = {"meta": meta, "runs": runs, "sweep_runs": sweep_runs, "comparison": comparison, "sweep": sweep}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(render(json.loads(json.dumps(results)), args.out, args.readme))


BEGIN, END = "<!-- accuracy results: begin (written by benchmarks/accuracy/reproduce.py) -->", "<!-- accuracy results: end -->"


def update_readme(path, text, out_rel):
    """Replace the README's marked results block with this run's tables and plots, so the
    README shows generated numbers and never hand-copied ones."""
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        print(f"{path} has no results markers; not updated", file=sys.stderr)
        return
    body = text.split("\n", 2)[2]  # drop the file's own title
    body = body.replace("](accuracy_vs", f"]({out_rel}/accuracy_vs")
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{body}\n{END}{tail}")


if __name__ == "__main__":
    main()
