"""The benchmarks' harness: machine description, statistics, tables, CSV and results files, a process pool.

Every script answers one question, prints a table, and writes its results files under ``benchmarks/results/``, each
beginning with (or, for CSV, beside a ``.md`` that states) the command, the date and the machine.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks._timing import set_clock

#: where every script writes its results by default (``--out``)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, str]:
    """What a reader needs to compare numbers across machines: date, CPU, cores, threads, load, versions, GPU."""
    import lightning

    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = "not installed"

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision_version,
        "lightning": lightning.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def print_machine(info: dict[str, str]) -> None:
    print("machine: " + ", ".join(f"{key}={value}" for key, value in info.items()))


def median(values: Sequence[float]) -> float:
    """Median, ``nan`` for no values."""
    return statistics.median(values) if values else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, ``nan`` for none)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: Optional[str] = None) -> str:
    """A plain-text table: right-aligned columns, one header line and a rule."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title] if title else []
    lines.append("  ".join(h.rjust(w) for h, w in zip(cells[0], widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]], preamble: str = "") -> None:
    """A CSV file; ``preamble`` (e.g. :func:`results_header`) goes first as ``# `` comment lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        handle.write(_comment(preamble))
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in text.splitlines())


def command_line() -> str:
    """The command that is running, as a reader can paste it (``python benchmarks/x.py --flag``)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def results_header(info: dict[str, str], settings: str) -> str:
    """The first lines of every results file: command, date, machine, settings."""
    machine = ", ".join(f"{key}={value}" for key, value in info.items() if key != "date")
    return f"command: {command_line()}\ndate: {info['date']}\nmachine: {machine}\nsettings: {settings}\n"


def write_report(out_dir: str, name: str, info: dict[str, str], settings: str, body: str) -> Optional[Path]:
    """Write ``out_dir/name``: the results header (:func:`results_header`) and ``body`` in a code block; say where.
    An empty ``out_dir`` writes nothing."""
    if not out_dir:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results_header(info, settings) + "\n```\n" + body + "\n```\n")
    print(f"wrote {path}")
    return path


def one_cpu_thread() -> dict[str, str]:
    """Set up a CPU micro-benchmark: one intra-op thread timed by its CPU time (``benchmarks._timing.set_clock``);
    print and return the machine (:func:`machine_info`)."""
    torch.set_num_threads(1)
    set_clock("cpu")
    info = machine_info("cpu")
    print_machine(info)
    return info


def quiet() -> None:
    """Silence Lightning's per-fit chatter in benchmark processes (their tables are the output)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def run_tasks(fn: Callable[..., dict[str, Any]], tasks: Sequence[tuple], jobs: int,
              initializer: Optional[Callable[..., None]] = None, initargs: tuple = ()) -> Iterator[dict[str, Any]]:
    """``fn(*task)`` for every task, in ``jobs`` processes (spawned, so each imports the package afresh) or in this
    one; yields results as they finish (in task order with one job)."""
    if jobs <= 1:
        if initializer is not None:
            initializer(*initargs)
        for task in tasks:
            yield fn(*task)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        futures = [pool.submit(fn, *task) for task in tasks]
        for future in as_completed(futures):
            yield future.result()


def run_child(script: str, *args: Any) -> Any:
    """Run ``python script --child *args`` in a fresh process and return the JSON its last output line holds.

    Micro-benchmarks whose time moves with where a process's buffers land (up to 2x here for the same code) run each
    measurement in several fresh processes and report the median over them."""
    done = subprocess.run([sys.executable, script, "--child", *map(str, args)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header (after its ``# `` comment lines), or none if it does not exist."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(line for line in handle if not line.startswith("# ")))


def read_preamble(path: Path) -> dict[str, str]:
    """The ``# key: value`` comment lines at the top of a results CSV (command, date, machine, settings)."""
    if not path.exists():
        return {}
    found = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("# "):
                break
            key, _, value = line[2:].rstrip("\n").partition(": ")
            found[key] = value
    return found


def resumed_note(path: Path, kept: int) -> str:
    """Said in the settings of a resumed run: how many runs came from the invocation that started the file."""
    if not kept:
        return ""
    first = read_preamble(path)
    return (f"; {kept} run(s) from earlier invocation(s), the first `{first.get('command', '?')}` started "
            f"{first.get('date', '?')}")


def append_csv(path: Path, headers: Sequence[str], row: Iterable[Any], preamble: str = "") -> None:
    """Append one row, writing ``preamble`` (comment lines) and the header first when the file is new (partial
    results survive a crash)."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            handle.write(_comment(preamble))
            writer.writerow(headers)
        writer.writerow(list(row))
