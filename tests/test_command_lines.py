"""Every command line the project documents answers ``--help``: the demo, the examples and the benchmark scripts.

Each runs in a fresh process from the repository root, as a user would type it. The benchmark scripts are collected
by globbing ``benchmarks/*.py`` (all but private modules), so a new script is covered without editing this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60

#: the arguments before ``--help`` of an example that has them: ``examples/train.py`` is a LightningCLI with subcommands
EXAMPLE_SUBCOMMANDS = {"train": [[], ["fit"]]}


def _examples() -> list[list[str]]:
    """``-m examples.NAME [SUBCOMMAND]`` for every example script with a command line (a ``__main__`` block)."""
    commands = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        if path.name.startswith("_") or '__name__ == "__main__"' not in path.read_text():
            continue
        for before in EXAMPLE_SUBCOMMANDS.get(path.stem, [[]]):
            commands.append(["-m", f"examples.{path.stem}", *before])
    return commands


def _benchmarks() -> list[list[str]]:
    """``benchmarks/NAME.py`` for every benchmark script, run as a file as the benchmarks' docstrings say."""
    return [[f"benchmarks/{path.name}"] for path in sorted((ROOT / "benchmarks").glob("*.py"))
            if not path.name.startswith("_")]


COMMANDS = [["-m", "lightning_multimix.demo"], *_examples(), *_benchmarks()]


def _help(command: list[str]) -> tuple[Optional[int], str]:
    """``python COMMAND --help``: its exit code (``None`` if it ran past the timeout) and its output."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "MPLBACKEND": "Agg"}
    try:
        done = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        return None, f"no answer after {TIMEOUT_S} s: {timeout.stdout or ''}{timeout.stderr or ''}"
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def answers(request: pytest.FixtureRequest) -> dict[str, tuple[Optional[int], str]]:
    """The answers of the selected commands, run a process per core at once (each is mostly torch's import time)."""
    selected = [item.callspec.params["command"] for item in request.session.items
                if getattr(item, "obj", None) is test_help]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return {" ".join(command): answer for command, answer in zip(selected, pool.map(_help, selected))}


def test_the_command_lines_are_found() -> None:
    ids = {" ".join(command) for command in COMMANDS}
    assert {"-m lightning_multimix.demo", "-m examples.train fit", "-m examples.timm_image_classification",
            "-m examples.hf_text_classification", "benchmarks/overhead.py", "benchmarks/accuracy.py"} <= ids


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(command) for command in COMMANDS])
def test_help(command: list[str], answers: dict[str, tuple[Optional[int], str]]) -> None:
    returncode, output = answers[" ".join(command)]
    assert returncode == 0, f"{' '.join(command)} --help exited with {returncode}:\n{output[-3000:]}"
    assert "usage" in output.lower(), f"{' '.join(command)} --help printed no usage:\n{output[-3000:]}"
