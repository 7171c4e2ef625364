"""Does MultiMix make the demo's model better? Every method, three regimes, mean +- std over seeds.

Every method of the demo's ``METHODS`` trains its SmallCNN through ``run_method`` (same initial weights, batches and
label noise per seed) in the demo's ``REGIMES`` and is tested on the 2,000 clean test images shipped in the package.
A table per regime: last-epoch test accuracy (the number to compare), the best epoch's (chosen on the test set), ECE,
alignment and uniformity of the test embeddings, seconds per epoch; then MultiMix()'s goal against input mixup and
ERM. Files in ``--out`` (default ``benchmarks/out``, ignored by git; ``--out benchmarks/results`` for the committed
ones): ``accuracy_runs.csv`` (appended as runs finish; ``--resume`` keeps its runs, ``--report`` only tabulates
them), ``accuracy_summary.csv``, ``accuracy.md``, ``accuracy.png``; with ``--curves``, ``accuracy_curves.csv``.

Examples::

    python benchmarks/accuracy.py --quick                         # smoke run: one seed, two steps per run
    python benchmarks/accuracy.py --jobs 2                        # every run (about 2.5 hours on 2 cores)
    python benchmarks/accuracy.py --report --out benchmarks/results   # re-tabulate the committed runs
    python benchmarks/accuracy.py --regimes clean --methods erm --seeds 0 --epochs 40 --curves  # how long is enough?
    python benchmarks/accuracy.py --regimes low_data,noisy --methods multimix,multimix_bce --jobs 2  # BCE recipe

``--task multilabel``: Fashion-MNIST 2x2 composites with BCE, its own regimes, methods and measures (mAP, F1; see
``lightning_multimix/demo/tasks.py``), files ``multilabel_*`` instead of ``accuracy_*``. ``--task segment``: the same
composites with a class per pixel, a small fully convolutional network (SmallFCN), its own regimes and methods (the
model's own per-pixel mixup and CutMix, and MultiMix on its per-pixel logits), measured by the mean IoU; files
``segment_*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._harness import (OUT_DIR, append_csv, format_table, machine_info, mean_std, print_machine, quiet,
                                 read_csv, results_header, resumed_note, run_tasks, write_csv)
from lightning_multimix.demo.plots import plot_benchmark
from lightning_multimix.demo.tasks import TASKS
from lightning_multimix.demo.training import run_method

TASK = TASKS["classify"]  # this process's (init_worker's): regimes, methods, run keys and measures
RUN_KEYS, MEASURES = TASK.run_keys, TASK.measures  # (column title, run key, scale, format) of the summary tables


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--task", default="classify", choices=tuple(TASKS), help="default %(default)s")
    parser.add_argument("--regimes", help="; ".join(f"{n}: {','.join(t.regimes)}" for n, t in TASKS.items()))
    parser.add_argument("--methods", help="; ".join(f"{n}: {','.join(t.methods)}" for n, t in TASKS.items()))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-dir", default=None, help="the full Fashion-MNIST (default: the shipped subset)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in <accuracy|multilabel|segment>_runs.csv")
    parser.add_argument("--report", action="store_true", help="train nothing: tabulate the runs in --out")
    parser.add_argument("--epochs", type=int, default=None, help="train every regime this long instead of its own")
    parser.add_argument("--curves", action="store_true",
                        help="also record the test metric (accuracy, mAP, mIoU) after every epoch")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 2 steps per run, tiny data")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    args.regimes, args.methods = (args.regimes or ",".join(task.benchmark_regimes),
                                  args.methods or ",".join(task.benchmark_methods))
    for name, known in (("regimes", task.regimes), ("methods", task.methods)):
        unknown = set(getattr(args, name).split(",")) - set(known)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}; expected names from {tuple(known)}")
    if args.jobs < 1 or args.threads < 0 or (args.epochs is not None and args.epochs < 1):
        parser.error("--jobs and --epochs must be >= 1, --threads >= 0")
    if args.quick:
        args.seeds = "0"
    return args


_DATA: Optional[tuple[Any, Any]] = None


def init_worker(data_dir: Optional[str], threads: int, quick: bool, task: str = "classify") -> None:
    global _DATA, TASK
    quiet()
    if threads > 0:
        torch.set_num_threads(threads)
    TASK = TASKS[task]
    _DATA = TASK.load(data_dir, quick)


def _regime(name: str, quick: bool, epochs: Optional[int] = None) -> Any:
    regime = TASK.regimes[name]
    if quick:  # the regime's data handling (subset, label noise), on a few steps
        return regime.quick(epochs)
    return dataclasses.replace(regime, epochs=epochs) if epochs is not None else regime


def train(regime_name: str, method: str, seed: int, quick: bool, epochs: Optional[int] = None,
          multimix_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One training run: ``run_method``'s result, with ``regime``, ``wall_seconds`` and ``curve``."""
    assert _DATA is not None, "call init_worker first"
    regime = _regime(regime_name, quick, epochs)
    started = time.perf_counter()
    result = run_method(method, train_data=regime.training_set(_DATA[0], seed), test_data=_DATA[1],
                        epochs=regime.epochs, seed=seed, multimix_options=multimix_options, progress=False,
                        test_every=regime.test_every, max_steps=2 if quick else -1)
    return {**result, "regime": regime_name, "wall_seconds": time.perf_counter() - started,
            "curve": curve(result["history"])}


def run_one(regime_name: str, method: str, seed: int, quick: bool, epochs: Optional[int] = None) -> dict[str, Any]:
    result = train(regime_name, method, seed, quick, epochs)  # only scalars and the curve travel back
    return {**{key: result[key] for key in TASK.run_keys}, "curve": result["curve"]}


def curve(history: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(h["epoch"], h[f"val_{TASK.metric}"]) for h in history if h[f"val_{TASK.metric}"] is not None]


def previous_runs(runs_path: Path, curves_path: Path, resume: bool, regimes: Sequence[str], methods: Sequence[str],
                  seeds: Sequence[int]) -> list[dict[str, Any]]:
    """``resume``: the runs of ``runs_path`` among these; else none, and a fresh start."""
    if not resume:
        for path in (runs_path, curves_path):
            path.unlink(missing_ok=True)
        return []
    done = [row for row in read_csv(runs_path) if row["regime"] in regimes and row["method"] in methods
            and int(row["seed"]) in seeds]
    print(f"resuming: {len(done)} run(s) already in {runs_path}")
    return done


def record_run(run: dict[str, Any], runs_path: Path, curves_path: Optional[Path], header: str) -> None:
    append_csv(runs_path, TASK.run_keys, [run[key] for key in TASK.run_keys], preamble=header)
    for epoch, acc in run["curve"] if curves_path is not None else ():
        append_csv(curves_path, ("regime", "method", "seed", "epoch", f"test_{TASK.metric}"),
                   [run["regime"], run["method"], run["seed"], epoch, acc], preamble=header)
    print(f"  {run['regime']:>8} {run['method']:>14} seed {run['seed']}: " + "  ".join(
        f"{title} {fmt.format(scale * float(run[key]))}" for title, key, scale, fmt in TASK.measures[:3])
        + f"  ({float(run['wall_seconds']):.0f} s)", flush=True)


def write_summary(out: Path, stem: str, summary: Sequence[dict[str, Any]], report: str, header: str) -> list[Path]:
    keys = ["regime", "method", "runs"] + [f"{key}_{s}" for _, key, _, _ in TASK.measures for s in ("mean", "std")]
    paths = [out / f"{stem}_summary.csv", out / f"{stem}.md"]
    write_csv(paths[0], keys, [[row[k] for k in keys] for row in summary], preamble=header)
    paths[1].write_text(header + "\n```\n" + report + "\n```\n")
    return paths


def summarise(runs: Sequence[dict[str, Any]], regimes: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for regime in regimes:
        for method in methods:
            mine = [r for r in runs if r["regime"] == regime and r["method"] == method]
            if mine:
                row: dict[str, Any] = {"regime": regime, "method": method, "runs": len(mine)}
                for _, key, scale, _ in TASK.measures:
                    values = [scale * float(r[key]) for r in mine if not math.isnan(float(r[key]))]
                    row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
                rows.append(row)
    return rows


def regime_table(summary: Sequence[dict[str, Any]], regime: str, description: Optional[str] = None) -> str:
    headers = ("method", "runs", *(title for title, *_ in TASK.measures))
    rows = [[row["method"], row["runs"], *(f"{fmt.format(row[f'{key}_mean'])} +- {fmt.format(row[f'{key}_std'])}"
                                           for _, key, _, fmt in TASK.measures)]
            for row in summary if row["regime"] == regime]
    title = f"== {regime}: {description or TASK.regimes[regime].description}; mean +- std over seeds =="
    return format_table(headers, rows, title=title)


def curve_table(curves: Sequence[dict[str, Any]], regime: str) -> str:
    mine = [c for c in curves if c["regime"] == regime]
    runs = list(dict.fromkeys((c["method"], int(c["seed"])) for c in mine))
    acc = {(c["method"], int(c["seed"]), int(c["epoch"])): 100.0 * float(c[f"test_{TASK.metric}"]) for c in mine}
    rows = [[epoch, *(f"{acc[(m, s, epoch)]:.2f}" if (m, s, epoch) in acc else "" for m, s in runs)]
            for epoch in sorted({int(c["epoch"]) for c in mine})]
    return format_table(("epoch", *(f"{m} seed {s}" for m, s in runs)), rows,
                        title=f"== {regime}: test {TASK.metric_name} % after every epoch ==")


def goal_table(summary: Sequence[dict[str, Any]], regimes: Sequence[str]) -> Optional[str]:
    """MultiMix()'s goal: within 1 point of input mixup, and ahead of it and of ERM with noisy labels."""
    by = {(r["regime"], r["method"]): r["test_acc_mean"] for r in summary}
    rows = []
    for regime in regimes:
        if all((regime, m) in by for m in ("erm", "mixup", "multimix")):
            erm, mixup, multimix = (by[(regime, m)] for m in ("erm", "mixup", "multimix"))
            noisy = regime == "noisy"
            goal = (multimix > mixup and multimix > erm) if noisy else multimix - mixup >= -1.0
            rows.append([regime, f"{erm:.2f}", f"{mixup:.2f}", f"{multimix:.2f}", f"{multimix - mixup:+.2f}",
                         f"{multimix - erm:+.2f}",
                         ("ahead of both: " if noisy else "within 1 point: ") + ("yes" if goal else "NO")])
    headers = ("regime", "ERM", "input mixup", "MultiMix()", "vs mixup", "vs ERM", "goal")
    return format_table(headers, rows, title="== the goal (last-epoch test accuracy %, means over seeds) ==") \
        if rows else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    init_worker(args.data_dir, args.threads, args.quick, args.task)  # a bad --data-dir fails here, before training
    regimes = [r for r in TASK.regimes if r in args.regimes.split(",")]
    methods = [m for m in TASK.methods if m in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path, curves_path = out / f"{TASK.stem}_runs.csv", out / f"{TASK.stem}_curves.csv"
    info = machine_info("cpu")
    print_machine(info)
    source = "the subset shipped in the package" if args.data_dir is None else args.data_dir
    settings = (f"{TASK.network} on {TASK.data} ({source}{', --quick' if args.quick else ''}); regimes {regimes}"
                f"{f', all trained for {args.epochs} epochs' if args.epochs else ''}; seeds {seeds}; "
                f"{args.threads or 'default'} thread(s) per run, {args.jobs} job(s)")
    print("settings: " + settings, flush=True)

    done = previous_runs(runs_path, curves_path, args.resume or args.report, regimes, methods, seeds)
    settings += resumed_note(runs_path, len(done)) + ("; --report: none trained by this invocation"
                                                      if args.report else "")
    finished = {(row["regime"], row["method"], int(row["seed"])) for row in done}
    # seed-major, then the long regimes first: partial results stay balanced and the pool ends on short runs
    order = sorted(regimes, key=lambda r: -TASK.regimes[r].cost)
    tasks = [(regime, method, seed, args.quick, args.epochs) for seed in seeds for regime in order
             for method in methods if (regime, method, seed) not in finished and not args.report]
    started = time.perf_counter()
    for run in run_tasks(run_one, tasks, args.jobs, init_worker, (args.data_dir, args.threads, args.quick, args.task)):
        record_run(run, runs_path, curves_path if args.curves else None, results_header(info, settings))
        done.append(run)

    summary = summarise(done, regimes, methods)
    described = {r: _regime(r, args.quick, args.epochs).description
                 + (f"; run for {args.epochs} epochs instead" if args.epochs else "") for r in regimes}
    tables = [regime_table(summary, regime, described[regime]) for regime in regimes]
    if args.curves:
        curves = [c for c in read_csv(curves_path) if c["regime"] in regimes and c["method"] in methods
                  and int(c["seed"]) in seeds]
        tables += [curve_table(curves, regime) for regime in regimes]
    report = "\n\n".join(tables + [args.task == "classify" and goal_table(summary, regimes) or ""]).rstrip()
    print("\n" + report + f"\n\nwall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min")
    written = write_summary(out, TASK.stem, summary, report, results_header(info, settings))
    png = plot_benchmark(summary, regimes, out / f"{TASK.stem}.png", f"{settings}\n{info['date']}, {info['cpu']}",
                         described, TASK.measures)
    print(f"wrote {runs_path}, {', '.join(map(str, written))}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
