"""Which MultiMix settings help? One factor at a time around the paper's protocol, mean +- std over seeds.

``MultiMix()`` (alpha 1, the whole batch, n = 1000, probability 0.5) trained as in ``accuracy.py`` in one regime, and
the same with one setting changed (``--configs``), same seeds. The table: last- and best-epoch accuracy, ECE, the
difference to the default (mean +- std of per-seed differences) and ``beats default``: the mean exceeds the default's
by more than two standard deviations. Files in ``--out``: ``sweep_<regime>_runs.csv`` and ``sweep_<regime>.md``.

Examples::

    python benchmarks/sweep.py --quick                       # smoke run
    python benchmarks/sweep.py --regime noisy --jobs 2       # every configuration, 3 seeds (hours on 2 cores)
"""

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks import accuracy
from benchmarks._harness import (OUT_DIR, append_csv, format_table, machine_info, mean_std, print_machine, quiet,
                                 read_csv, results_header, resumed_note, run_tasks, script_parser, write_report)
from lightning_multimix.demo.training import REGIMES

#: configuration name -> MultiMix arguments changed from the defaults
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {}, "alpha=0.1": {"alpha": 0.1}, "alpha=0.5": {"alpha": 0.5}, "alpha=2": {"alpha": 2.0},
    "tuple_size=2": {"tuple_size": 2}, "tuple_size=4": {"tuple_size": 4}, "tuple_size=8": {"tuple_size": 8},
    "n_tuples=100": {"n_tuples": 100}, "n_tuples=10000": {"n_tuples": 10000},
    "probability=0.25": {"probability": 0.25}, "probability=0.75": {"probability": 0.75},
    "probability=1": {"probability": 1.0},
}
RUN_KEYS = ("config", "seed", "test_acc", "best_acc", "best_epoch", "ece", "sec_per_epoch", "steps", "wall_seconds")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--regime", default="noisy", choices=list(REGIMES))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="from " + ",".join(CONFIGS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--out", default=str(OUT_DIR), help="output folder (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the runs CSV")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 2 steps per run, tiny data")
    args = parser.parse_args(argv)
    if unknown := set(args.configs.split(",")) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(unknown)}; expected names from {tuple(CONFIGS)}")
    if args.quick:
        args.seeds = "0"
    return args


def run_one(regime: str, config: str, seed: int, quick: bool) -> dict[str, Any]:
    result = accuracy.train(regime, "multimix", seed, quick, multimix_options=CONFIGS[config])
    return {key: result[key] for key in RUN_KEYS if key != "config"} | {"config": config}


def report(runs: Sequence[dict[str, Any]], configs: Sequence[str], regime: str) -> str:
    by_config = {c: {int(r["seed"]): r for r in runs if r["config"] == c} for c in configs}
    base = by_config.get("default", {})
    base_std = mean_std([100 * float(r["test_acc"]) for r in base.values()])[1]
    rows = []
    for config in configs:
        mine = by_config[config]
        if not mine:
            continue
        stats = {key: mean_std([scale * float(r[key]) for r in mine.values()])
                 for key, scale in (("test_acc", 100), ("best_acc", 100), ("ece", 1))}
        row = [config, len(mine), *(f"{m:.3f} +- {s:.3f}" if key == "ece" else f"{m:.2f} +- {s:.2f}"
                                    for key, (m, s) in stats.items())]
        paired = [100 * (float(mine[s]["test_acc"]) - float(base[s]["test_acc"])) for s in mine if s in base]
        if config == "default" or not paired:
            row += ["", ""]
        else:
            mean, spread = mean_std(paired)
            better = len(paired) > 1 and mean > 2 * max(stats["test_acc"][1], base_std)
            row += [f"{mean:+.2f} +- {spread:.2f}", "yes" if better else "no"]
        rows.append(row)
    headers = ("config", "runs", "last acc %", "best acc %", "ECE", "vs default (paired)", "beats default")
    return format_table(headers, rows, title=f"== MultiMix settings, {regime}: {REGIMES[regime].description} ==")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs_path = Path(args.out) / f"sweep_{args.regime}_runs.csv"
    accuracy.init_worker(None, args.threads, args.quick)
    info = machine_info("cpu")
    print_machine(info)
    settings = (f"MultiMix() and one-factor changes, SmallCNN on the Fashion-MNIST subset shipped in the package"
                f"{' (--quick)' if args.quick else ''}; regime {args.regime}; seeds {seeds}; "
                f"{args.threads or 'default'} thread(s) per run, {args.jobs} job(s)")
    print("settings: " + settings, flush=True)
    done: list[dict[str, Any]] = []
    if args.resume:
        done = [r for r in read_csv(runs_path) if r["config"] in configs and int(r["seed"]) in seeds]
        settings += resumed_note(runs_path, len(done))
    else:
        runs_path.unlink(missing_ok=True)
    finished = {(r["config"], int(r["seed"])) for r in done}
    tasks = [(args.regime, config, seed, args.quick) for seed in seeds for config in configs
             if (config, seed) not in finished]
    started = time.perf_counter()
    for run in run_tasks(run_one, tasks, args.jobs, accuracy.init_worker, (None, args.threads, args.quick)):
        append_csv(runs_path, RUN_KEYS, [run[key] for key in RUN_KEYS], preamble=results_header(info, settings))
        done.append(run)
        print(f"  {run['config']:>16} seed {run['seed']}: last {100 * float(run['test_acc']):.2f}%  best "
              f"{100 * float(run['best_acc']):.2f}%  ({float(run['wall_seconds']):.0f} s)", flush=True)
    table = report(done, configs, args.regime)
    print("\n" + table + f"\n\nwall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min")
    write_report(args.out, f"sweep_{args.regime}.md", info, settings, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
