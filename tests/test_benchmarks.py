"""Smoke tests of the benchmark scripts: they run end to end (``--quick``) and report every method.

No timing or accuracy is asserted: the numbers of a quick run on a CI machine mean nothing. Both tests are end-to-end
runs of several Trainers (about a minute each on 2 CPU cores), hence ``slow``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OVERHEAD_METHODS = ("none", "mixup", "cutmix", "pairs", "multimix-128", "multimix-1000", "multimix-10000", "dense-1000",
                    "distill-1000")
ACCURACY_METHODS = ("erm", "mixup", "cutmix", "pairs", "multimix", "multimix_every", "dense", "distill")
REGIMES = ("clean", "low_data", "noisy")
SWEEP_CONFIGS = ("default", "alpha=0.1", "alpha=0.5", "alpha=2", "tuple_size=2", "tuple_size=4", "tuple_size=8",
                 "n_tuples=100", "n_tuples=10000", "probability=0.25", "probability=0.75", "probability=1")


def _run(*args: str, timeout: int = 400) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _table_rows(stdout: str, title_start: str) -> list[list[str]]:
    """The rows (split on whitespace) of the first table whose title line starts with ``title_start``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    rows = []
    for line in lines[start + 3:]:  # title, header, rule
        if not line.strip() or line.split()[0].endswith(":"):  # a blank line or "notes: ..." ends the table
            break
        rows.append(line.split())
    return rows


@pytest.mark.slow
def test_overhead_quick_prints_every_method_and_writes_csv(tmp_path: Path) -> None:
    stdout = _run("benchmarks/overhead.py", "--quick", "--out", str(tmp_path))
    assert "machine: " in stdout and "torch=" in stdout
    for model in ("smallcnn", "preactresnet18"):
        trainer_rows = _table_rows(stdout, f"== Trainer step, {model}")
        assert [row[1] for row in trainer_rows] == list(OVERHEAD_METHODS)
        core_rows = _table_rows(stdout, f"== The core alone (ms, medians of 3), {model}")
        assert [row[1] for row in core_rows] == list(OVERHEAD_METHODS)
    with open(tmp_path / "overhead_smallcnn-preactresnet18_trainer.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == list(OVERHEAD_METHODS) * 2
    for kind in ("core", "steps"):
        assert (tmp_path / f"overhead_smallcnn-preactresnet18_{kind}.csv").stat().st_size > 0


@pytest.mark.slow
def test_accuracy_quick_prints_every_regime_and_method_and_writes_files(tmp_path: Path) -> None:
    stdout = _run("benchmarks/accuracy.py", "--quick", "--out", str(tmp_path))
    for regime in REGIMES:
        rows = _table_rows(stdout, f"== {regime}: ")
        assert [row[0] for row in rows] == list(ACCURACY_METHODS)
    goal = _table_rows(stdout, "== the goal")
    assert [row[0] for row in goal] == list(REGIMES)
    for name in ("accuracy_runs.csv", "accuracy_summary.csv"):
        assert (tmp_path / name).stat().st_size > 0
    header = (tmp_path / "accuracy.md").read_text().splitlines()
    assert header[0] == f"command: python benchmarks/accuracy.py --quick --out {tmp_path}"
    assert header[1].startswith("date: ") and header[2].startswith("machine: ")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "accuracy_runs.csv", newline="") as handle:
        runs = list(csv.DictReader(handle))
    assert sorted((run["regime"], run["method"]) for run in runs) == sorted(
        (regime, method) for regime in REGIMES for method in ACCURACY_METHODS)
    assert all(0.0 <= float(run["test_acc"]) <= float(run["best_acc"]) <= 1.0 for run in runs)
    # --resume keeps the finished runs and trains nothing more
    again = _run("benchmarks/accuracy.py", "--quick", "--resume", "--out", str(tmp_path))
    assert f"resuming: {len(runs)} run(s)" in again
    with open(tmp_path / "accuracy_runs.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(runs)


@pytest.mark.slow
def test_sweep_quick_reports_every_configuration(tmp_path: Path) -> None:
    stdout = _run("benchmarks/sweep.py", "--quick", "--out", str(tmp_path))
    rows = _table_rows(stdout, "== MultiMix settings, noisy")
    assert [row[0] for row in rows] == list(SWEEP_CONFIGS)
    assert (tmp_path / "sweep_noisy.md").read_text().startswith("command: python benchmarks/sweep.py --quick")
