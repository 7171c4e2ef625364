"""Smoke tests of the benchmark scripts: they run end to end (``--quick``) and report every method; by default they
write into a folder git ignores; they use only the library's stable public names.

No timing or accuracy is asserted: the numbers of a quick run on a CI machine mean nothing. The end-to-end runs start
several Trainers each (up to a few minutes on 2 CPU cores), hence ``slow``.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._harness import OUT_DIR, read_csv  # noqa: E402

OVERHEAD_METHODS = ("none", "mixup", "cutmix", "input-mixup", "input-mixup-in-step", "pairs", "multimix-1000",
                    "multimix-1000-in-step", "multimix-10000", "protocol-1000", "dense-1000", "dense-10000",
                    "distill-1000")
ACCURACY_METHODS = ("erm", "mixup", "cutmix", "switch", "pairs", "multimix", "multimix_every", "dense", "distill")
REGIMES = ("clean", "low_data", "noisy")
#: the library names a benchmark may import: module -> names (None: the module itself, or anything of the demo)
PUBLIC = {"lightning_multimix": {"MultiMix", "Dense", "SelfDistillation", "multimix_objective", "mixup_objective",
                                 "TeacherOutputs"},
          "lightning_multimix.sampling": {"dirichlet_weights", "mixup_pairing", "pair_weights"},
          "lightning_multimix.interpolation": {"mix_with_partner"}, "lightning_multimix.batch": {"InputMixer"},
          "lightning_multimix.teacher": {"Distiller"},
          "lightning_multimix.positions": {"chunk_size", "position_multimix_loss"}}
SWEEP_CONFIGS = ("default", "alpha=0.1", "alpha=0.2", "alpha=0.5", "alpha=2", "tuple_size=2", "tuple_size=4",
                 "tuple_size=8", "n_tuples=100", "n_tuples=10000", "probability=0.25", "probability=0.75",
                 "probability=1", "tuple_size=2+alpha=0.2", "tuple_size=4+alpha=0.2")


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
        if not line.strip() or line.split()[0].endswith(":") or line.startswith("wrote "):  # a blank line, "notes:
            # ...", or the files written end the table
            break
        rows.append(line.split())
    return rows


@pytest.mark.slow
def test_overhead_quick_prints_every_method_and_writes_files(tmp_path: Path) -> None:
    stdout = _run("benchmarks/overhead.py", "--quick", "--out", str(tmp_path))
    assert "machine: " in stdout and "torch=" in stdout
    rows = _table_rows(stdout, "== Trainer step, smallcnn")
    assert [row[0] for row in rows] == list(OVERHEAD_METHODS)
    core = _table_rows(stdout, "== Where the time goes")
    assert [row[0] for row in core] == [m for m in OVERHEAD_METHODS
                                        if m not in ("none", "mixup", "cutmix") and not m.endswith("-in-step")]
    # sample, teacher, objective, backward, total, the callback's own: only distillation has a teacher stage
    assert all(len(row) == (7 if row[0] == "distill-1000" else 6) for row in core)
    assert all(float(cell) > 0 for row in core for cell in row[1:-1])
    header = (tmp_path / "overhead_smallcnn_cpu.md").read_text().splitlines()
    assert header[0].startswith("command: python benchmarks/overhead.py --quick") and header[1].startswith("date: ")
    with open(tmp_path / "overhead_smallcnn_cpu.csv", newline="") as handle:
        lines = handle.read().splitlines()
    assert lines[0].startswith("# command: ") and [line.split(",")[0] for line in lines[5:]] == list(OVERHEAD_METHODS)


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
    assert (tmp_path / "accuracy_runs.csv").read_text().startswith("# command: python benchmarks/accuracy.py")
    runs = read_csv(tmp_path / "accuracy_runs.csv")
    assert sorted((run["regime"], run["method"]) for run in runs) == sorted(
        (regime, method) for regime in REGIMES for method in ACCURACY_METHODS)
    assert all(0.0 <= float(run["test_acc"]) <= float(run["best_acc"]) <= 1.0 for run in runs)
    # --resume keeps the finished runs and trains nothing more
    again = _run("benchmarks/accuracy.py", "--quick", "--resume", "--out", str(tmp_path))
    assert f"resuming: {len(runs)} run(s)" in again
    assert len(read_csv(tmp_path / "accuracy_runs.csv")) == len(runs)
    # --report tabulates the runs there (here without those of one method) and trains none
    path = tmp_path / "accuracy_runs.csv"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if f",{ACCURACY_METHODS[0]}," not in line))
    kept = read_csv(path)
    report = _run("benchmarks/accuracy.py", "--quick", "--report", "--out", str(tmp_path))
    assert read_csv(path) == kept
    for regime in REGIMES:
        assert [row[0] for row in _table_rows(report, f"== {regime}: ")] == list(ACCURACY_METHODS[1:])


def test_accuracy_epochs_override_and_curve_table() -> None:
    from benchmarks import accuracy
    from lightning_multimix.demo.training import REGIMES as DEMO_REGIMES

    args = accuracy.parse_args(["--regimes", "clean", "--methods", "erm", "--epochs", "60", "--curves"])
    assert (args.epochs, args.curves) == (60, True)
    assert accuracy._regime("clean", False, 60) == dataclasses.replace(DEMO_REGIMES["clean"], epochs=60)
    assert accuracy._regime("noisy", False) == DEMO_REGIMES["noisy"]
    assert accuracy.curve([{"epoch": 1, "val_acc": None}, {"epoch": 2, "val_acc": 0.5}]) == [(2, 0.5)]
    curves = [{"regime": "clean", "method": m, "seed": str(s), "epoch": str(e), "test_acc": str(a)}
              for m, s, e, a in (("erm", 0, 1, 0.7), ("erm", 0, 2, 0.81234), ("switch", 1, 2, 0.8))]
    lines = accuracy.curve_table(curves, "clean").splitlines()
    assert lines[0] == "== clean: test accuracy % after every epoch =="
    assert [line.split() for line in lines[1:]] == [["epoch", "erm", "seed", "0", "switch", "seed", "1"],
                                                    ["-----", "----------", "-------------"],
                                                    ["1", "70.00"], ["2", "81.23", "80.00"]]


@pytest.mark.slow
def test_sweep_quick_reports_every_configuration(tmp_path: Path) -> None:
    stdout = _run("benchmarks/sweep.py", "--quick", "--out", str(tmp_path))
    rows = _table_rows(stdout, "== MultiMix settings, noisy")
    assert [row[0] for row in rows] == list(SWEEP_CONFIGS)
    assert all(row[-1] == "no" for row in rows[1:])  # one seed: no standard deviation, nothing "beats default"
    assert (tmp_path / "sweep_noisy.md").read_text().startswith("command: python benchmarks/sweep.py --quick")
    runs = read_csv(tmp_path / "sweep_noisy_runs.csv")
    assert [run["config"] for run in runs] == list(SWEEP_CONFIGS)
    assert all(0.0 <= float(run["test_acc"]) <= float(run["best_acc"]) <= 1.0 for run in runs)


def test_every_script_writes_into_an_ignored_folder_by_default() -> None:
    """A run without ``--out`` never touches the committed results: the default folder is ignored by git."""
    from benchmarks import accuracy, overhead, paper_protocol, sweep

    assert OUT_DIR == REPO / "benchmarks" / "out"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(OUT_DIR / "accuracy_runs.csv")], cwd=REPO)
    assert ignored.returncode == 0, "benchmarks/out/ is not in .gitignore"
    for args in (accuracy.parse_args(["--quick"]), sweep.parse_args([]), overhead.parse_args(["--quick"]),
                 paper_protocol.parse_args(["--synthetic"])):
        assert args.out == str(OUT_DIR)
    for script in ("step_cost", "versions"):
        text = (REPO / "benchmarks" / f"{script}.py").read_text()
        assert '"--out", default=str(OUT_DIR)' in text
    assert "results" not in (REPO / "benchmarks" / "_harness.py").read_text().split("OUT_DIR = ")[1].splitlines()[0]


def test_benchmarks_import_only_the_stable_public_names_of_the_library() -> None:
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_multimix"):
                if node.module.startswith("lightning_multimix.demo"):
                    continue
                assert node.module in PUBLIC, f"{path.name} imports from {node.module}"
                names = {alias.name for alias in node.names}
                assert names <= PUBLIC[node.module], f"{path.name}: {sorted(names - PUBLIC[node.module])}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("lightning_multimix") for a in node.names), path.name
        # no private method of a class, such as ``TrainingStep._mix_batch`` (patched, it would tie a benchmark to it)
        assert not re.search(r"\b[A-Z]\w*\._[a-z]\w*", path.read_text()), path.name


def test_step_cost_quick_counts_every_method_and_writes_its_results_file(tmp_path: Path) -> None:
    stdout = _run("benchmarks/step_cost.py", "--quick", "--out", str(tmp_path))
    methods = ["none", "Callback()", "MultiMix()", "input-mixup", "tv-mixup"]
    title = "== per training step, tiny models"
    text = (tmp_path / "step_cost_tiny_cpu.md").read_text()
    header = text.splitlines()
    assert header[0] == f"command: python benchmarks/step_cost.py --quick --out {tmp_path}"
    assert header[1].startswith("date: ") and header[2].startswith("machine: ") and header[3].startswith("settings: ")
    for output in (stdout, text.split("```")[1]):  # the printed table and the file's
        rows = _table_rows(output, title)
        assert [row[:2] for row in rows] == [[method, "mlp"] for method in methods]
        assert all(len(row) == 11 for row in rows) and all(float(cell) == float(cell) for row in rows
                                                           for cell in row[2:])  # numbers (nan is not)
        by_name = {row[0]: row for row in rows}
        assert float(by_name["Callback()"][3]) == 0 and float(by_name["Callback()"][7]) > 0  # dispatch, no op
        # no host read of a device scalar in any step (once per fit, at the first batch and the epoch's end: cancels)
        assert float(by_name["MultiMix()"][4]) == 0 and float(by_name["input-mixup"][4]) == 0
        for method in ("MultiMix()", "input-mixup"):  # the operations each adds most, by name
            top = _table_rows(output, f"== {method}: the 10 operations")
            assert 0 < len(top) <= 10 and all(len(row) == 2 and row[0].startswith("aten::") for row in top)
            assert all(float(count) > 0 for _, count in top)
