"""Which MultiMix settings help? One factor at a time around the paper's protocol, mean +- std over seeds.

``MultiMix()`` with its defaults for the task's targets (alpha 1, the whole batch, n = 1000, probability 0.5, with
``options.TYPE_DEFAULTS`` over them: multi-hot targets and labels per position have their own) trained as in
``accuracy.py`` in one regime of one task (``--task``), and the same with settings changed (``--configs``), same seeds.
The table: the task's measures (last- and best-epoch accuracy and ECE; mAP and F1 for ``multilabel``; mIoU for
``segment``), the difference to the default (mean +- std of per-seed differences of the last epoch's metric) and
``beats default``: the mean exceeds the default's by more than two standard deviations. Files in ``--out``:
``sweep_<regime>_runs.csv`` and ``sweep_<regime>.md`` (other tasks: ``sweep_<task>_<regime>*``).

Examples::

    python benchmarks/sweep.py --quick                       # smoke run
    python benchmarks/sweep.py --regime noisy --jobs 2       # every configuration, 3 seeds (hours on 2 cores)
    python benchmarks/sweep.py --task multilabel --regime low_data \
        --configs default,tuple_size=2,tuple_size=4,alpha=0.2,tuple_size=2+alpha=0.2,tuple_size=4+alpha=0.2
    python benchmarks/sweep.py --task segment --regime low_data \
        --configs default,tuple_size=2,tuple_size=4,tuple_size=2+alpha=0.2
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
from lightning_multimix.demo.tasks import TASKS

#: configuration name -> MultiMix arguments changed from the defaults
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {}, "alpha=0.1": {"alpha": 0.1}, "alpha=0.2": {"alpha": 0.2}, "alpha=0.5": {"alpha": 0.5},
    "alpha=2": {"alpha": 2.0},
    "tuple_size=2": {"tuple_size": 2}, "tuple_size=4": {"tuple_size": 4}, "tuple_size=8": {"tuple_size": 8},
    "n_tuples=100": {"n_tuples": 100}, "n_tuples=10000": {"n_tuples": 10000},
    "probability=0.25": {"probability": 0.25}, "probability=0.75": {"probability": 0.75},
    "probability=1": {"probability": 1.0},
    "tuple_size=2+alpha=0.2": {"tuple_size": 2, "alpha": 0.2},
    "tuple_size=4+alpha=0.2": {"tuple_size": 4, "alpha": 0.2},
}


def run_keys(task: str) -> tuple[str, ...]:
    """The columns of the runs file: the task's results per run."""
    return ("config", "seed", *TASKS[task].results, "sec_per_epoch", "steps", "wall_seconds")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--task", default="classify", choices=tuple(TASKS), help="default %(default)s")
    parser.add_argument("--regime", default="noisy", help="; ".join(f"{n}: {','.join(t.regimes)}"
                                                                    for n, t in TASKS.items()))
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
    if args.regime not in TASKS[args.task].regimes:
        parser.error(f"--regime {args.regime!r}: --task {args.task} has {tuple(TASKS[args.task].regimes)}")
    if args.quick:
        args.seeds = "0"
    return args


def run_one(regime: str, config: str, seed: int, quick: bool) -> dict[str, Any]:
    result = accuracy.train(regime, "multimix", seed, quick, multimix_options=CONFIGS[config])
    keys = ("seed", *accuracy.TASK.results, "sec_per_epoch", "steps", "wall_seconds")  # accuracy.TASK: init_worker's
    return {key: result[key] for key in keys} | {"config": config}


def report(runs: Sequence[dict[str, Any]], configs: Sequence[str], regime: str, task: str = "classify") -> str:
    measures = TASKS[task].measures[:3]
    metric = measures[0][1]
    by_config = {c: {int(r["seed"]): r for r in runs if r["config"] == c} for c in configs}
    base = by_config.get("default", {})
    base_std = mean_std([100 * float(r[metric]) for r in base.values()])[1]
    rows = []
    for config in configs:
        mine = by_config[config]
        if not mine:
            continue
        stats = {key: (fmt, mean_std([scale * float(r[key]) for r in mine.values()]))
                 for _, key, scale, fmt in measures}
        row = [config, len(mine), *(f"{fmt.format(m)} +- {fmt.format(s)}" for fmt, (m, s) in stats.values())]
        paired = [100 * (float(mine[s][metric]) - float(base[s][metric])) for s in mine if s in base]
        if config == "default" or not paired:
            row += ["", ""]
        else:
            mean, spread = mean_std(paired)
            better = len(paired) > 1 and mean > 2 * max(stats[metric][1][1], base_std)
            row += [f"{mean:+.2f} +- {spread:.2f}", "yes" if better else "no"]
        rows.append(row)
    headers = ("config", "runs", *(title for title, *_ in measures), "vs default (paired)", "beats default")
    where = regime if task == "classify" else f"{task} {regime}"  # the classification task's titles name no task
    title = f"== MultiMix settings, {where}: {TASKS[task].regimes[regime].description} =="
    return format_table(headers, rows, title=title)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet()
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    stem = f"sweep_{args.regime}" if args.task == "classify" else f"sweep_{args.task}_{args.regime}"
    runs_path, keys = Path(args.out) / f"{stem}_runs.csv", run_keys(args.task)
    accuracy.init_worker(None, args.threads, args.quick, args.task)
    info = machine_info("cpu")
    print_machine(info)
    task = TASKS[args.task]
    settings = (f"MultiMix() and changed settings, {task.network} on {task.data} (the subset shipped in the package)"
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
    metric = TASKS[args.task].metric
    init = (None, args.threads, args.quick, args.task)
    for run in run_tasks(run_one, tasks, args.jobs, accuracy.init_worker, init):
        append_csv(runs_path, keys, [run[key] for key in keys], preamble=results_header(info, settings))
        done.append(run)
        print(f"  {run['config']:>22} seed {run['seed']}: last {100 * float(run[f'test_{metric}']):.2f}%  best "
              f"{100 * float(run[f'best_{metric}']):.2f}%  ({float(run['wall_seconds']):.0f} s)", flush=True)
    table = report(done, configs, args.regime, args.task)
    print("\n" + table + f"\n\nwall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min")
    write_report(args.out, f"{stem}.md", info, settings, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
