"""``benchmarks/position_memory.py --quick`` runs end to end: a row per ``n``, the chunked loss checked against the
naive one, and its results files (command first). No number is asserted beyond being finite."""

from __future__ import annotations

import math
from pathlib import Path

from helpers import run_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "position_memory.py"
COLUMNS = 13  # n, chunk, ERM ms, MultiMix ms, ratio, naive ms, naive ratio, 2 x extra MB, logits MB, 2 x /logits, check


def test_position_memory_quick_prints_a_checked_row_per_n_and_writes_its_files(tmp_path: Path) -> None:
    stdout = run_script(SCRIPT, "--quick", "--out", str(tmp_path)).stdout
    lines = stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("== per-position MultiMix step"))
    rows = [line.split() for line in lines[title + 3:title + 5]]  # title, header, rule, then b x 1 and b x 4
    assert [row[0] for row in rows] == ["4", "16"] and all(len(row) == COLUMNS for row in rows), stdout
    assert all(row[-1] == "ok" for row in rows)
    assert all(math.isfinite(float(cell)) for row in rows for cell in row[1:-1])
    assert not lines[title + 5].strip()  # the table ends there
    report = (tmp_path / "position_memory.md").read_text().splitlines()
    assert report[0].startswith("command: python ") and "position_memory.py --quick" in report[0]
    assert report[1].startswith("date: ") and report[2].startswith("machine: ")
    csv_lines = (tmp_path / "position_memory.csv").read_text().splitlines()
    assert csv_lines[0].startswith("# command: ") and [line.split(",")[0] for line in csv_lines[5:]] == ["4", "16"]
