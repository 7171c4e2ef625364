"""Accuracy of MultiMix and its peers on Fashion-MNIST with the demo's CNN: mean +- std over seeds.

What is measured
----------------
Every method trains :class:`~lightning_multimix.models.SmallCNN` through :func:`lightning_multimix.demo.run_method`
(the demo's training: same initial weights and batch order for a given seed, SGD lr 0.1 with momentum, Nesterov,
weight decay 5e-4 and a cosine schedule, batch 128) and is tested on the test split. Methods: ``erm`` (no mixing),
``mixup`` and ``cutmix`` (torchvision ``v2.MixUp`` / ``v2.CutMix``, alpha 1), ``pairs`` (last-layer manifold mixup),
``multimix`` (n = 1000), ``dense`` (Dense MultiMix, n = 1000) and ``distill`` (MultiMix + EMA self-distillation).

Data: the full Fashion-MNIST when ``--data-dir`` holds it, else the subset shipped in the package (10,000 training,
2,000 test images). ``--train-per-class`` / ``--test-per-class`` take balanced subsets of either.

How to read the output
----------------------
One line per run as it finishes, then a table of mean +- std over seeds: ``test acc`` (top-1, %), ``ECE`` (expected
calibration error, 15 bins, lower is better calibrated), ``alignment`` (mean squared distance between normalised
test embeddings of the same class: lower = tighter classes), ``uniformity`` (log mean ``exp(-2 d^2)`` over all pairs:
lower = more uniformly spread), ``s/epoch`` (training wall seconds per epoch, evaluation excluded: noisy on a shared
machine, compare with ``benchmarks/overhead.py`` for step costs). With few epochs the ranking of methods is not the
converged one: mixing methods regularise and usually need more epochs than ERM to pay off.

Files written into ``--out`` (default ``benchmarks/results``): ``accuracy_runs.csv`` (one row per run),
``accuracy_summary.csv`` (mean and std per method), ``accuracy.png`` (the four measures with error bars) and
``accuracy_meta.json`` (command, machine, date, settings).

Examples::

    python benchmarks/accuracy.py --quick --out /tmp/acc                # CI smoke run, one seed, a few steps
    python benchmarks/accuracy.py --epochs 2 --jobs 2                    # embedded subset, 3 seeds, 2 processes
    python benchmarks/accuracy.py --data-dir ~/data/fashion-mnist        # full data set, the demo's 5 epochs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: an A/B run can point it elsewhere

import torch

from benchmarks._common import format_table, machine_info, mean_std, print_machine, write_csv
from lightning_multimix.data import load_fashion_mnist
from lightning_multimix.demo import DEFAULT_EPOCHS, METHODS, run_method

#: (column title, result key, scale, format) of the summary table
MEASURES: tuple[tuple[str, str, float, str], ...] = (
    ("test acc %", "test_acc", 100.0, "{:.2f}"),
    ("ECE", "ece", 1.0, "{:.4f}"),
    ("alignment", "alignment", 1.0, "{:.4f}"),
    ("uniformity", "uniformity", 1.0, "{:.4f}"),
    ("s/epoch", "sec_per_epoch", 1.0, "{:.1f}"),
)
RUN_KEYS = ("method", "seed", "test_acc", "ece", "alignment", "uniformity", "sec_per_epoch", "epochs", "steps",
            "wall_seconds")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder with the full Fashion-MNIST (default: the subset "
                                                         "shipped in the package)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"epochs per run (the demo's: {DEFAULT_EPOCHS})")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop every run after this many steps (-1: none)")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time budget of each run's training")
    parser.add_argument("--n-tuples", type=int, default=1000, help="MultiMix's n (multimix, dense, distill)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-per-class", type=int, default=None, help="balanced training subset (default: all)")
    parser.add_argument("--test-per-class", type=int, default=None, help="balanced test subset (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bars (with --jobs 1)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: one seed, a few steps on a small subset")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.max_steps = "0", 1, 3
        args.train_per_class = args.train_per_class or 40
        args.test_per_class = args.test_per_class or 20
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; expected names from {METHODS}")
    if args.epochs < 1 or args.jobs < 1:
        parser.error("--epochs and --jobs must be >= 1")
    return args


def _quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    train, test = load_fashion_mnist(args.data_dir)
    if args.train_per_class:
        train = train.balanced_subset(args.train_per_class)
    if args.test_per_class:
        test = test.balanced_subset(args.test_per_class)
    return train, test


_DATA: Optional[tuple[Any, Any]] = None


def _init_worker(args: argparse.Namespace) -> None:
    global _DATA
    _quiet()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _DATA = _load(args)


def _run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """One training run; only scalars travel back (not the embeddings)."""
    assert _DATA is not None
    train, test = _DATA
    started = time.perf_counter()
    result = run_method(method, train_data=train, test_data=test, epochs=args.epochs, seed=seed,
                        n_tuples=args.n_tuples, batch_size=args.batch_size, max_steps=args.max_steps,
                        max_minutes=args.max_minutes, progress=args.progress and args.jobs == 1)
    out = {key: result.get(key) for key in RUN_KEYS}
    out["wall_seconds"] = time.perf_counter() - started
    return out


def summarise(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every measure, per method (in ``methods`` order)."""
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "runs": len(mine)}
        for _, key, scale, _ in MEASURES:
            values = [scale * float(r[key]) for r in mine if r[key] is not None and not math.isnan(float(r[key]))]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        rows.append(row)
    return rows


def plot(summary: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy, ECE, alignment vs uniformity, seconds per epoch, with +- one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in summary]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(names))]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (label, key) in zip(axes.flat[:2], (("test accuracy (%)", "test_acc"), ("ECE (lower is better)", "ece"))):
        ax.bar(names, [r[f"{key}_mean"] for r in summary], yerr=[r[f"{key}_std"] for r in summary], color=colors,
               capsize=4)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        if key == "test_acc":
            low = min(r["test_acc_mean"] - r["test_acc_std"] for r in summary)
            ax.set_ylim(max(0.0, low - 2.0), None)
    ax = axes.flat[2]
    for row, color in zip(summary, colors):
        ax.errorbar(row["uniformity_mean"], row["alignment_mean"], xerr=row["uniformity_std"],
                    yerr=row["alignment_std"], fmt="o", color=color, label=row["method"], capsize=3)
    ax.set_xlabel("uniformity (lower: more uniform)")
    ax.set_ylabel("alignment (lower: tighter classes)")
    ax.legend(fontsize=8)
    ax = axes.flat[3]
    ax.bar(names, [r["sec_per_epoch_mean"] for r in summary], yerr=[r["sec_per_epoch_std"] for r in summary],
           color=colors, capsize=4)
    ax.set_ylabel("training seconds per epoch")
    ax.tick_params(axis="x", rotation=30)
    fig.suptitle("\n".join(textwrap.fill(line, 130) for line in title.splitlines()), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    _quiet()
    methods = [m for m in METHODS if m in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _init_worker(args)  # also loads the data here, so a bad --data-dir fails before any training
    assert _DATA is not None
    train, test = _DATA
    info = machine_info("cpu")
    print_machine(info)
    source = "the subset shipped in the package" if args.data_dir is None else repr(args.data_dir)
    settings = (f"Fashion-MNIST from {source}: {len(train)} train / {len(test)} test images; SmallCNN, batch "
                f"{args.batch_size}, {args.epochs} epoch(s), max_steps {args.max_steps}, n_tuples {args.n_tuples}, "
                f"seeds {seeds}, {args.threads or 'default'} thread(s) per run, {args.jobs} job(s)")
    print("settings: " + settings, flush=True)

    tasks = [(method, seed) for seed in seeds for method in methods]  # seed-major: partial results stay balanced
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    if args.jobs == 1:
        for method, seed in tasks:
            runs.append(_run_one(args, method, seed))
            _print_run(runs[-1])
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(args,)) as pool:
            futures = [pool.submit(_run_one, args, method, seed) for method, seed in tasks]
            for future in futures:
                runs.append(future.result())
                _print_run(runs[-1])
    total = time.perf_counter() - started

    summary = summarise(runs, methods)
    headers = ("method", "runs", *(title for title, *_ in MEASURES))
    rows = [[row["method"], row["runs"], *(f"{fmt.format(row[f'{key}_mean'])} +- {fmt.format(row[f'{key}_std'])}"
                                           for _, key, _, fmt in MEASURES)] for row in summary]
    print()
    print(format_table(headers, rows, title=f"== Fashion-MNIST, mean +- std over {len(seeds)} seed(s) =="))
    print(f"\ntotal wall time: {total / 60:.1f} min")

    write_csv(out / "accuracy_runs.csv", RUN_KEYS, [[run[key] for key in RUN_KEYS] for run in runs])
    summary_keys = ["method", "runs"] + [f"{key}_{stat}" for _, key, _, _ in MEASURES for stat in ("mean", "std")]
    write_csv(out / "accuracy_summary.csv", summary_keys, [[row[k] for k in summary_keys] for row in summary])
    png = plot(summary, out / "accuracy.png", f"{settings}\n{info['date']}, {info['cpu']}")
    meta = {"command": " ".join(["python", *sys.argv]), "machine": info, "settings": settings,
            "args": vars(args), "total_seconds": total}
    (out / "accuracy_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'accuracy_runs.csv'}, {out / 'accuracy_summary.csv'}, {png}, {out / 'accuracy_meta.json'}")
    return 0


def _print_run(run: dict[str, Any]) -> None:
    print(f"  {run['method']:>9} seed {run['seed']}: test acc {100 * run['test_acc']:.2f}%  ECE {run['ece']:.4f}  "
          f"alignment {run['alignment']:.4f}  uniformity {run['uniformity']:.4f}  "
          f"{run['sec_per_epoch']:.1f} s/epoch  ({run['epochs']} epoch(s), {run['steps']} steps, "
          f"{run['wall_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
