"""The benchmarks' harness: machine, statistics, tables, results files (command, date, machine first), a pool."""

import argparse
import contextlib
import csv
import datetime
import itertools
import logging
import os
import platform
import shlex
import statistics
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional

#: every script's default ``--out``, ignored by git (the committed results: ``--out benchmarks/results``)
OUT_DIR = Path(__file__).resolve().parent / "out"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo", encoding="utf-8") as handle:
        return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    return platform.processor() or platform.machine()


def host_info() -> dict[str, str]:
    """Date, CPU, cores and load: what :func:`machine_info` says without importing torch."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": str(os.cpu_count()),
            "load_avg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"}


def machine_info(device: str) -> dict[str, str]:
    """What a reader needs to compare numbers across machines: date, CPU, cores, threads, load, versions, GPU."""
    import lightning
    import torch

    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except ImportError:
        torchvision_version = "not installed"
    info = {**host_info(), "torch_threads": str(torch.get_num_threads()), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision_version, "lightning": lightning.__version__,
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def print_machine(info: dict[str, str]) -> None:
    print("machine: " + ", ".join(f"{key}={value}" for key, value in info.items()))


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


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph is the description, the rest the ``--help`` epilogue."""
    description, _, epilog = doc.partition("\n\n")
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def command_line() -> str:
    """The command that is running, as a reader can paste it (``python benchmarks/x.py --flag``)."""
    script = Path(sys.argv[0])
    if script.resolve().is_relative_to(Path.cwd()):
        script = script.resolve().relative_to(Path.cwd())
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def results_header(info: dict[str, str], settings: str) -> str:
    """The first lines of every results file: command, date, machine, settings."""
    machine = ", ".join(f"{key}={value}" for key, value in info.items() if key != "date")
    return f"command: {command_line()}\ndate: {info['date']}\nmachine: {machine}\nsettings: {settings}\n"


def write_report(out_dir: str, name: str, info: dict[str, str], settings: str, body: str) -> Optional[Path]:
    """Write ``out_dir/name``: the results header and ``body`` in a code block; an empty ``out_dir`` writes nothing."""
    if not out_dir:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results_header(info, settings) + "\n```\n" + body + "\n```\n")
    print(f"wrote {path}")
    return path


def write_csv(path: Path, headers: Sequence[str], rows: Iterable[Iterable[Any]], preamble: str = "",
              mode: str = "w") -> None:
    """A CSV file, ``preamble`` (:func:`results_header`) first as ``# `` lines; ``mode="a"``: append to one."""
    new = mode == "w" or not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, newline="", encoding="utf-8") as handle:
        if new:
            handle.write("".join(f"# {line}\n" for line in preamble.splitlines()))
            csv.writer(handle).writerow(headers)
        csv.writer(handle).writerows(rows)


def append_csv(path: Path, headers: Sequence[str], row: Iterable[Any], preamble: str = "") -> None:
    """Append one row (partial results survive a crash), writing ``preamble`` and the header first to a new file."""
    write_csv(path, headers, [list(row)], preamble, mode="a")


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
    with open(path, encoding="utf-8") as handle:
        lines = itertools.takewhile(lambda line: line.startswith("# "), handle)
        return dict(line[2:].rstrip("\n").partition(": ")[::2] for line in lines)


def resumed_note(path: Path, kept: int) -> str:
    """Said in the settings of a resumed run: how many runs came from the invocation that started the file."""
    if not kept:
        return ""
    first = read_preamble(path)
    return (f"; {kept} run(s) from earlier invocation(s), the first `{first.get('command', '?')}` started "
            f"{first.get('date', '?')}")


def quiet() -> None:
    """Silence Lightning's per-fit chatter in benchmark processes (their tables are the output)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def run_tasks(fn: Callable[..., dict[str, Any]], tasks: Sequence[tuple], jobs: int,
              initializer: Optional[Callable[..., None]] = None, initargs: tuple = ()) -> Iterator[dict[str, Any]]:
    """``fn(*task)`` for every task, in ``jobs`` spawned processes or in this one; yields results as they finish."""
    if jobs <= 1:
        if initializer is not None:
            initializer(*initargs)
        for task in tasks:
            yield fn(*task)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        for future in as_completed([pool.submit(fn, *task) for task in tasks]):
            yield future.result()
