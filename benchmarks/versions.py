"""Which versions of Python, torch, Lightning and torchmetrics does the package work with? The core and callback tests
in a fresh virtual environment per configuration (never in CI: about 3 GB of CUDA wheels each).

Per configuration, under ``--workdir``: a venv with its Python (``lowest`` / ``newest`` that ``requires-python`` allows
and found here, or ``X.Y``); ``pip install SNAPSHOT[test]`` (the package and ``tests/`` as committed) with its pins as
constraints (``declared``: pyproject's lower bound; ``2.3``: the newest 2.3.x; ``latest``) and none of the machine's
pip configuration; then ``pytest TESTS``, one thread. The table: versions installed, test counts, seconds, first
failure; exit status 0 when all passed. Files: ``versions.md`` in ``--out`` (``''``: none); ``NAME/install.log`` and
``NAME/tests.log`` in ``--workdir``.

Examples::

    python benchmarks/versions.py --list        # what each configuration resolves to here
    python benchmarks/versions.py --configs lowest-declared,newest-released   # the published table (about 5 min)
    python benchmarks/versions.py --configs none --custom python=3.9,torch=2.3 --workdir /tmp/versions
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import OUT_DIR, format_table, host_info, script_parser, write_report  # noqa: E402 (no torch)

REPO = Path(__file__).resolve().parents[1]
PINNED = ("torch", "lightning", "torchmetrics")
REPORTED = (*PINNED, "numpy")
COLUMNS = ("python", *REPORTED, "passed", "failed", "errors", "skipped", "install s", "tests s")
THREADS = 1  # intra-op threads of the tests
#: the fast core and callback tests (no slow, DDP, GPU, demo, CLI or model-zoo ones)
TESTS = tuple(f"tests/test_{name}.py" for name in (
    "sampling", "losses", "objective", "metrics", "callback", "protocol", "dense", "distill", "health", "precision",
    "users_loss", "reliability", "resume"))
#: what the snapshot copies: enough to build the package and run TESTS with their settings
SNAPSHOT = ("pyproject.toml", "setup.cfg", "conftest.py", "README.md", "LICENSE", "lightning_multimix", "tests")


@dataclass(frozen=True)
class Config:
    name: str
    python: str = "lowest"  # "lowest", "newest" (of those found here that requires-python allows) or "3.10"
    pins: dict[str, str] = field(default_factory=dict)  # package -> "declared", "latest" or a minor version ("2.3")
    extra: tuple[str, ...] = ()  # further constraint lines ("numpy<2")
    note: str = ""


CONFIGS: tuple[Config, ...] = (
    Config("lowest-declared", "lowest", {name: "declared" for name in PINNED}, note="every lower bound"),
    Config("newest-released", "newest", {name: "latest" for name in PINNED}, note="the newest releases"),
)


def read_pyproject() -> tuple[str, list[str]]:
    """``requires-python`` and the ``dependencies`` of ``pyproject.toml`` (enough of TOML for these two keys)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    requires = re.search(r'^requires-python\s*=\s*"([^"]*)"', text, re.M)
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
    return (requires.group(1) if requires else ""), (re.findall(r'"([^"]+)"', block.group(1)) if block else [])


def constraints(config: Config, dependencies: Sequence[str]) -> list[str]:
    """The pip constraint lines of a configuration."""
    lines = []
    for name in PINNED:
        pin = config.pins.get(name, "latest")
        if pin == "declared":
            found = next((m for dep in dependencies
                          if (m := re.match(rf"^{re.escape(name)}\s*(?:\[[^\]]*\])?\s*[^;]*?>=\s*(\d+)\.(\d+)", dep))),
                         None)
            pin = f"{found.group(1)}.{found.group(2)}" if found else "latest"
        if pin != "latest":
            lines.append(f"{name}=={pin}.*")
    return lines + list(config.extra)


def find_python(minor: str) -> Optional[tuple[str, str]]:
    """``(sys.executable, X.Y.Z)`` of a working Python ``X.Y`` with venv, on PATH or under pyenv."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [shutil.which(f"python{minor}"),
                  *sorted(glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}")),
                          key=lambda p: [int(v) for v in re.findall(r"\d+", Path(p).parents[1].name)], reverse=True)]
    for candidate in filter(None, candidates):
        try:
            done = subprocess.run([candidate, "-c", "import platform, sys, venv; print(sys.executable); "
                                   "print(platform.python_version())"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = done.stdout.split()
        if done.returncode == 0 and len(lines) == 2 and lines[1].startswith(minor + "."):
            return lines[0], lines[1]
    return None


def pythons_here(requires: str) -> dict[str, tuple[str, str]]:
    """Every Python 3.8-3.15 found here that ``requires-python`` (its ``>=`` and ``<`` clauses) allows, oldest first."""
    found = {}
    for minor in range(8, 16):
        if all((op == ">=" and (3, minor) >= (int(a), int(b))) or (op == "<" and (3, minor) < (int(a), int(b)))
               for op, a, b in re.findall(r"(>=|<)\s*(\d+)\.(\d+)", requires)):
            if hit := find_python(f"3.{minor}"):
                found[f"3.{minor}"] = hit
    return found


def resolve_python(config: Config, pythons: dict[str, tuple[str, str]]) -> Optional[tuple[str, str]]:
    if config.python not in ("lowest", "newest"):
        return pythons.get(config.python) or find_python(config.python)
    ordered = list(pythons.values()) or [None]
    return ordered[0] if config.python == "lowest" else ordered[-1]


def git(*command: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True, check=True).stdout


def snapshot(dest: Path) -> str:
    """Extract SNAPSHOT as committed at HEAD into ``dest``; say which commit."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    commit = git("rev-parse", "--short", "HEAD").strip()
    present = git("ls-tree", "--name-only", commit, "--", *SNAPSHOT).split()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "--", *present],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return f"commit {commit} (HEAD)"


def child_env(venv: Path, cache: Path, constraint_file: Path) -> dict[str, str]:
    """The venv first on PATH, THREADS threads, none of the caller's Python or pip configuration, our constraints."""
    dropped = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "CONDA_PREFIX", "PIP_FIND_LINKS",
               "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), PIP_CONFIG_FILE=os.devnull,
               PIP_CONSTRAINT=str(constraint_file), PIP_CACHE_DIR=str(cache), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_PROGRESS_BAR="off", PIP_NO_INPUT="1", OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               OPENBLAS_NUM_THREADS=str(THREADS), MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    return env


def last_line(text: str, prefix: str = "") -> str:
    return next((line for line in map(str.strip, reversed(text.splitlines())) if line and line.startswith(prefix)), "")


def run_logged(command: Sequence[str], log: Path, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``command`` with its output in ``log``; its exit status (124 on timeout) and output."""
    try:
        done = subprocess.run(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or ""
        code, output = 124, (out.decode(errors="replace") if isinstance(out, bytes) else out) + "\nTIMEOUT"
    log.write_text("$ " + " ".join(command) + "\n" + output)
    return code, output


def pytest_counts(output: str) -> tuple[Optional[dict[str, int]], list[str]]:
    """Pytest's counts from its summary line (None if there is none) and failures (``-rfE``) as ``test - message``."""
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)\b", line)), "")
    found = {word.rstrip("s").replace("error", "errors"): int(n)
             for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    failures = [line.split(" ", 1)[1].split("::", 1)[-1][:160] for line in output.splitlines()
                if line.startswith(("FAILED ", "ERROR "))]
    return ({key: found.get(key, 0) for key in ("passed", "failed", "errors", "skipped")} if summary else None,
            failures)


def run_config(config: Config, python: Optional[tuple[str, str]], lines: list[str], source: Path,
               workdir: Path) -> dict[str, object]:
    """Build the configuration's environment, install the snapshot, run TESTS: one table row, as a dict."""
    row: dict[str, object] = {**dict.fromkeys(COLUMNS, "-"), "config": config.name, "first": "", "failures": [],
                              "ok": False, "python": python[1] if python else "-"}
    if python is None:
        row["first"] = f"no python: no Python {config.python} found here"
        return row
    folder, start = workdir / config.name, time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    venv, constraint_file = folder / "venv", folder / "constraints.txt"
    constraint_file.write_text("".join(line + "\n" for line in lines))
    env = child_env(venv, workdir / "pip-cache", constraint_file)
    py = str(venv / "bin" / "python")
    print(f"[{config.name}] Python {python[1]} ({python[0]}), constraints: {', '.join(lines) or 'none'}", flush=True)
    code, output = run_logged([python[0], "-m", "venv", "--clear", str(venv)], folder / "venv.log", env, folder, 600)
    if code == 0:
        code, output = run_logged([py, "-m", "pip", "install", f"{source}[test]"], folder / "install.log", env,
                                  folder, 1800)
    row["install s"] = f"{time.perf_counter() - start:.0f}"
    try:
        if code != 0:
            row["first"] = "install failed: " + (last_line(output, "ERROR:") or last_line(output))
            return row
        listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], env=env, capture_output=True, text=True,
                                timeout=120, check=True).stdout
        installed = {package["name"].lower(): package["version"] for package in json.loads(listed)}
        row.update({name: installed.get(name, "-") for name in REPORTED})
        start = time.perf_counter()
        code, output = run_logged([py, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *TESTS],
                                  folder / "tests.log", env, source, 1200)
        row["tests s"] = f"{time.perf_counter() - start:.0f}"
        counts, failures = pytest_counts(output)
        if counts is None:
            row["first"] = f"pytest exited {code} with no summary: " + last_line(output)
            return row
        row.update(counts, first=failures[0] if failures else "", failures=failures)
        row["ok"] = code == 0 and counts["failed"] == 0 and counts["errors"] == 0
        if code != 0 and not failures:
            row["first"] = f"pytest exited {code}: " + last_line(output)
        return row
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def parse_custom(spec: str) -> Config:
    """``python=3.9,torch=2.3[,lightning=2.5][,torchmetrics=1.4][,extra=numpy<2][,name=NAME]`` as a ``Config``."""
    values: dict[str, str] = {}
    extra: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("python", "name", "extra", *PINNED):
            raise argparse.ArgumentTypeError(f"--custom {spec!r}: {part!r} is not KEY=VALUE with KEY in python, "
                                             f"name, extra, {', '.join(PINNED)}")
        if key == "extra":
            extra.append(value)
        else:
            values[key] = value
    name = values.get("name") or "custom-" + "-".join(f"{k}{values[k]}" for k in ("python", *PINNED) if k in values)
    return Config(name, values.get("python", "lowest"), {n: values.get(n, "declared") for n in PINNED}, tuple(extra),
                  note=f"--custom {spec}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = script_parser(__doc__)
    names = [config.name for config in CONFIGS]
    parser.add_argument("--configs", default="all", help=f"comma-separated, of {', '.join(names)}; 'all' or 'none'")
    parser.add_argument("--custom", action="append", default=[], type=parse_custom, metavar="SPEC",
                        help="one more configuration, e.g. python=3.9,torch=2.4,lightning=2.5 (a minor version, "
                             "'declared' (default) or 'latest'; python: X.Y, 'lowest' or 'newest'; also "
                             "extra=CONSTRAINT, name=NAME); repeatable")
    parser.add_argument("--workdir", default="", help="environments, logs, pip's cache (default: a temporary folder)")
    parser.add_argument("--list", action="store_true", help="print what each configuration resolves to and stop")
    parser.add_argument("--out", default=str(OUT_DIR), help="where versions.md goes (default %(default)s; '': none)")
    args = parser.parse_args(argv)

    wanted = {"all": names, "none": []}.get(args.configs, [name.strip() for name in args.configs.split(",")])
    if set(wanted) - set(names):
        parser.error(f"--configs: unknown {', '.join(sorted(set(wanted) - set(names)))}; known: {', '.join(names)}")
    selected = [config for config in CONFIGS if config.name in wanted] + args.custom
    if not selected:
        parser.error("no configuration selected")
    requires, dependencies = read_pyproject()
    pythons = pythons_here(requires)
    plan = [(config, resolve_python(config, pythons), constraints(config, dependencies)) for config in selected]
    print(f"requires-python {requires!r}; Pythons found: "
          + ", ".join(f"{version} ({path})" for path, version in pythons.values()))
    for config, python, lines in plan:
        print(f"  {config.name}: Python {python[1] if python else config.python + ' (not found)'}, constraints: "
              f"{', '.join(lines) or 'none'}{'  -- ' + config.note if config.note else ''}")
    if args.list:
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="multimix-versions-")).resolve()
    if workdir == REPO or REPO in workdir.parents:
        parser.error(f"--workdir {workdir} is inside the repository: give one outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    info = {**host_info(), "os": sys.platform, "pythons": ", ".join(version for _, version in pythons.values())}
    copied = snapshot(workdir / "src")
    print(f"workdir {workdir}; source: {copied}")
    started, rows = time.perf_counter(), []
    try:
        for config, python, lines in plan:
            row = run_config(config, python, lines, workdir / "src", workdir)
            rows.append(row)
            print(f"[{config.name}] {'passed' if row['ok'] else 'FAILED'}: {row['passed']} passed, {row['failed']} "
                  f"failed, {row['errors']} errors, {row['skipped']} skipped; {row['first']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    table = format_table(("configuration", "result", *COLUMNS, "first failure"),
                         [[row["config"], "pass" if row["ok"] else "FAIL", *(row[key] for key in COLUMNS),
                           str(row["first"])[:100] or "-"] for row in rows],
                         title=f"== the core and callback tests ({len(TESTS)} files) per configuration, "
                               f"{THREADS} thread(s) ==")
    asked = "\n".join(f"  {config.name}: Python {config.python}, constraints "
                      f"{', '.join(lines) or 'none (the newest releases)'}{'; ' + config.note if config.note else ''}"
                      for config, _, lines in plan)
    failed = "\n".join(f"  {row['config']}:\n" + "\n".join(f"    {line}" for line in row["failures"][:10])
                       for row in rows if row["failures"])
    body = (f"{table}\n\nasked for:\n{asked}\n" + (f"every failure (the first 10):\n{failed}\n" if failed else "")
            + f"tests: {' '.join(TESTS)}\ntotal: {time.perf_counter() - started:.0f} s")
    print("\n" + body + "\n")
    settings = (f"source {copied}; requires-python {requires!r}; pip install SNAPSHOT[test] in a new venv per "
                f"configuration, pins as pip constraints; {THREADS} thread(s); one configuration at a time")
    write_report(args.out, "versions.md", info, settings, body)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
