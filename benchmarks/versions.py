"""Which versions of Python, torch, Lightning and torchmetrics does the package really work with? The core and
callback tests, run in a scratch environment per configuration.

What is measured
----------------
For every configuration (``--configs``; ``--list`` shows them resolved), in a new virtual environment under
``--workdir`` (default: a temporary folder, never inside the repository), one after the other:

1. ``python -m venv`` with the configuration's Python: ``lowest``, the oldest Python found here that the package's
   ``requires-python`` allows; ``newest``, the newest found; or a version (``3.10``). Pythons are found as
   ``pythonX.Y`` on ``PATH`` (one that runs) or under pyenv's ``versions/``.
2. ``pip install SNAPSHOT[test]``: a copy of the packaging files, ``lightning_multimix/`` and ``tests/`` as
   committed at ``--source`` (default ``HEAD``; ``worktree``: the working tree as it is), taken once at the start (so
   the repository gets no build files and edits in progress do not leak in), installed as a user installs it from
   the registry, with the configuration's pins as pip constraints. pip runs with ``PIP_CONFIG_FILE`` set to the null
   device: the machine's pip configuration (local wheels, caps) is not read; ``PIP_INDEX_URL`` is kept. A pin
   ``torch==2.2.*`` takes the newest patch release of that minor version; ``declared`` is the lower bound of
   ``pyproject.toml`` as a minor version (``torch>=2.2``: ``2.2.*``), read at run time; ``latest`` (or no pin) is
   the newest release the registry has for that Python. No extras beyond ``test``: the selected tests need no
   torchvision, NumPy or matplotlib (NumPy still comes with torchmetrics).
3. ``python -m pytest TESTS`` in the snapshot (its ``setup.cfg`` and ``conftest.py``: slow tests skipped), the fast
   core and callback tests (``TESTS`` below): sampling, interpolation and the soft cross-entropy, the objective, the
   metrics (torchmetrics), the callback's fit, its protocol, dense mode and self-distillation, health checks,
   precision, users' losses, the reliability regressions, and resuming from a checkpoint. One intra-op thread
   (``--threads``), one process at a time. Counts come from pytest's JUnit XML.

The configurations: ``lowest-declared`` (every lower bound of ``pyproject.toml`` on the oldest Python it allows), the
bisection steps from there that the results file shows (``torch-2.3``, ``lightning-2.4``, ``lightning-2.5``,
``torch-2.3-lightning-2.5``: one package's minor version raised at a time), ``lowest-passing`` (the lowest minor
versions found to pass: what ``pyproject.toml``'s lower bounds should say) and ``newest-released`` (the newest
releases on the newest Python here). ``--custom`` adds one, for further bisecting.

How to read the output
----------------------
One row per configuration: the versions actually installed (pip's metadata: the Python, torch, Lightning,
torchmetrics and NumPy), the test counts (``passed``, ``failed``, ``errors``: errors in setup or collection,
``skipped``), the seconds spent creating the environment and installing (downloads included) and testing, and
the first failure as ``test: exception line`` (cut at 100 characters). A configuration whose environment could not be
built says ``install failed`` with pip's error line, or ``no python`` if no such interpreter is here. Below the table,
what each configuration asked for and its failures in full (the first 10). ``result`` is ``pass`` when the
configuration installed and no test failed or erred; the exit status is 0 when every configuration passed.

Files written into ``--out`` (default ``benchmarks/results``; ``--out ''`` writes nothing): ``versions.md``
(command, date, machine, settings, the table). Into ``--workdir``: per configuration, ``NAME/install.log``,
``NAME/tests.log``, ``NAME/junit.xml`` (the virtual environment ``NAME/venv``, about 5 GB with a CUDA build of
torch, is deleted after its run unless ``--keep``), ``src/`` (the snapshot) and ``pip-cache/``; a temporary workdir is
deleted at the end unless ``--keep``.

Examples::

    python benchmarks/versions.py            # every configuration: the published table (about 15 minutes, 20 GB
                                             # downloaded: PyPI's torch wheels for Linux are CUDA builds)
    python benchmarks/versions.py --list                             # what each configuration resolves to here
    python benchmarks/versions.py --configs lowest-declared --workdir /tmp/versions --out ''
    # bisecting: the lowest declared versions but torch 2.3 (unnamed packages take their declared minor version)
    python benchmarks/versions.py --configs none --custom python=3.9,torch=2.3 --workdir /tmp/versions --out ''
"""

from __future__ import annotations

import argparse
import datetime
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))

# benchmarks._harness imports torch: it is imported in main(), after the arguments are read, so that --help is quick

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

#: the packages whose versions are pinned and reported
PINNED = ("torch", "lightning", "torchmetrics")
REPORTED = (*PINNED, "numpy")

#: the fast core and callback tests (no slow, DDP, GPU, demo, CLI or model-zoo ones), relative to the repository
TESTS = (
    "tests/test_sampling.py",  # Dirichlet and pair weights, the random stream
    "tests/test_losses.py",  # interpolation, one-hot, soft cross-entropy
    "tests/test_objective.py",  # the MultiMix and mixup objectives
    "tests/test_metrics.py",  # the torchmetrics Metrics
    "tests/test_callback.py",  # the callback's fit
    "tests/test_protocol.py",  # the protocol: which batches are mixed and how
    "tests/test_dense.py",  # dense mode (its torchvision part skips the whole file without torchvision)
    "tests/test_distill.py",  # self-distillation, the EMA teacher
    "tests/test_health.py",  # non-finite losses, labels out of range
    "tests/test_precision.py",  # mixed precision, accumulation, clipping
    "tests/test_users_loss.py",  # the user's own loss
    "tests/test_reliability.py",  # regressions of users' modules
    "tests/test_resume.py",  # resuming from a checkpoint, bit for bit
)

#: what the snapshot copies from the working tree: enough to build the package and run TESTS with their settings
SNAPSHOT = ("pyproject.toml", "setup.cfg", "conftest.py", "README.md", "LICENSE", "lightning_multimix", "tests")


@dataclass(frozen=True)
class Config:
    name: str
    python: str = "lowest"  # "lowest", "newest" (of those found here that requires-python allows) or "3.10"
    #: package -> "declared" (pyproject's lower bound, as a minor version), "latest" or a minor version ("2.3")
    pins: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()  # further constraint lines ("numpy<2")
    note: str = ""


DECLARED = {name: "declared" for name in PINNED}
CONFIGS: tuple[Config, ...] = (
    Config("lowest-declared", "lowest", DECLARED, note="every lower bound of pyproject.toml"),
    # the bisection from there, one package's minor version at a time (on Python 3.9, the oldest requires-python allows)
    Config("torch-2.3", "3.9", {"torch": "2.3", "lightning": "2.3", "torchmetrics": "1.3"}, note="bisection"),
    Config("lightning-2.4", "3.9", {"torch": "2.2", "lightning": "2.4", "torchmetrics": "1.3"}, note="bisection"),
    Config("lightning-2.5", "3.9", {"torch": "2.2", "lightning": "2.5", "torchmetrics": "1.3"}, note="bisection"),
    Config("torch-2.3-lightning-2.5", "3.9", {"torch": "2.3", "lightning": "2.5", "torchmetrics": "1.3"},
           note="bisection"),
    Config("lowest-passing", "3.9", {"torch": "2.4", "lightning": "2.5", "torchmetrics": "1.3"},
           note="the lowest minor versions that pass: the lower bounds pyproject.toml should declare"),
    Config("newest-released", "newest", {name: "latest" for name in PINNED}, note="the newest releases"),
)


# ------------------------------------------------------------------------------------------------- what is declared

def read_pyproject(repo: Path) -> tuple[str, list[str]]:
    """``requires-python`` and the ``dependencies`` of ``pyproject.toml``."""
    text = (repo / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib

        project = tomllib.loads(text)["project"]
        return project.get("requires-python", ""), list(project.get("dependencies", []))
    except ImportError:  # Python < 3.11: enough of TOML for these two keys
        requires = re.search(r'^requires-python\s*=\s*"([^"]*)"', text, re.M)
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        deps = re.findall(r'"([^"]+)"', block.group(1)) if block else []
        return (requires.group(1) if requires else ""), deps


def declared_minor(dependencies: Sequence[str], name: str) -> Optional[str]:
    """The ``X.Y`` of ``name>=X.Y[.Z]`` among the dependencies, if declared so."""
    for dep in dependencies:
        found = re.match(rf"^{re.escape(name)}\s*(?:\[[^\]]*\])?\s*[^;]*?>=\s*(\d+)\.(\d+)", dep)
        if found:
            return f"{found.group(1)}.{found.group(2)}"
    return None


def python_allowed(requires: str, version: tuple[int, int]) -> bool:
    """Whether ``X.Y`` meets ``requires-python`` (its ``>=`` and ``<`` clauses; others are not checked)."""
    for op, major, minor in re.findall(r"(>=|<)\s*(\d+)\.(\d+)", requires):
        bound = (int(major), int(minor))
        if (op == ">=" and version < bound) or (op == "<" and version >= bound):
            return False
    return True


def constraints(config: Config, dependencies: Sequence[str]) -> list[str]:
    """The pip constraint lines of a configuration."""
    lines = []
    for name in PINNED:
        pin = config.pins.get(name, "latest")
        if pin == "declared":
            pin = declared_minor(dependencies, name) or "latest"
        if pin != "latest":
            lines.append(f"{name}=={pin}.*")
    return lines + list(config.extra)


# ----------------------------------------------------------------------------------------------------- interpreters

def python_version(executable: str) -> Optional[tuple[str, str]]:
    """``(sys.executable, X.Y.Z)`` of an interpreter that runs and has venv, else None (a pyenv shim of a version
    that is not selected fails)."""
    try:
        done = subprocess.run([executable, "-c", "import sys, venv; print(sys.executable); "
                                                 "print('%d.%d.%d' % sys.version_info[:3])"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return (lines[0], lines[1]) if done.returncode == 0 and len(lines) == 2 else None


def find_python(minor: str) -> Optional[tuple[str, str]]:
    """``(path, X.Y.Z)`` of a Python ``X.Y``: ``pythonX.Y`` on PATH, else the newest pyenv ``versions/X.Y.*``."""
    candidates = [shutil.which(f"python{minor}")]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(pyenv_root, "versions", f"{minor}.*", "bin", f"python{minor}"))
    candidates += sorted(found, key=lambda p: [int(v) for v in re.findall(r"\d+", Path(p).parents[1].name)],
                         reverse=True)
    candidates += [f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            found_here = python_version(candidate)
            if found_here and found_here[1].startswith(minor + "."):
                return found_here
    return None


def pythons_here(requires: str) -> dict[str, tuple[str, str]]:
    """Every Python 3.8-3.15 found here that ``requires-python`` allows, by ``X.Y``, oldest first."""
    found = {}
    for minor in range(8, 16):
        if python_allowed(requires, (3, minor)):
            hit = find_python(f"3.{minor}")
            if hit:
                found[f"3.{minor}"] = hit
    return found


def resolve_python(config: Config, pythons: dict[str, tuple[str, str]]) -> Optional[tuple[str, str]]:
    if config.python == "lowest":
        return next(iter(pythons.values()), None)
    if config.python == "newest":
        return next(reversed(pythons.values()), None) if pythons else None
    return pythons.get(config.python) or find_python(config.python)


# -------------------------------------------------------------------------------------------------------- the runs

def git(repo: Path, *command: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *command], capture_output=True, text=True, check=True).stdout


def snapshot(repo: Path, dest: Path, source: str) -> str:
    """Copy the files of SNAPSHOT to ``dest``: as committed at ``source`` (a git revision), or as they are in the
    working tree (``source`` ``worktree``: what git tracks or would track). Return what was copied, for the report."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if source != "worktree":
        commit = git(repo, "rev-parse", "--short", source).strip()
        present = git(repo, "ls-tree", "--name-only", commit, "--", *SNAPSHOT).split()
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit, "--", *present],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        return f"commit {commit} ({source})"
    try:
        listed = git(repo, "ls-files", "-co", "--exclude-standard", "--", *SNAPSHOT).splitlines()
        commit = git(repo, "rev-parse", "--short", "HEAD").strip()
        changed = git(repo, "status", "--porcelain", "--", *SNAPSHOT).splitlines()
    except (OSError, subprocess.CalledProcessError):  # no git: copy the folders as they are
        listed, commit, changed = [], "unknown (no git)", []
        for name in SNAPSHOT:
            path = repo / name
            if path.is_dir():
                listed += [str(p.relative_to(repo)) for p in path.rglob("*")
                           if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]
            elif path.is_file():
                listed.append(name)
    for name in listed:
        if (repo / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name)
    return f"the working tree at commit {commit}" + (f" + {len(changed)} changed file(s)" if changed else "")


def child_env(venv: Path, threads: int, cache: Path, constraint_file: Path) -> dict[str, str]:
    """The environment of the installs and tests: the venv first on PATH, nothing of the caller's Python, ``threads``
    threads, and pip as a user's plain pip: the registry (``PIP_INDEX_URL`` if set) and our constraints only, none of
    the machine's pip configuration (local wheels without ``Requires-Python`` there sent pip 23's resolver into hours
    of backtracking on Python 3.9; its constraints cap torch)."""
    dropped = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "CONDA_PREFIX", "PIP_FIND_LINKS",
               "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), PIP_CONFIG_FILE=os.devnull,
               PIP_CONSTRAINT=str(constraint_file), PIP_CACHE_DIR=str(cache), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_PROGRESS_BAR="off", PIP_NO_INPUT="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    return env


def last_line(text: str, prefix: str = "") -> str:
    """The last non-blank line of ``text`` that starts with ``prefix``, stripped ("" if none)."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]
    return next((line for line in reversed(lines) if line), "")


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def run_logged(command: Sequence[str], log: Path, env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run ``command`` with its output in ``log``; its exit status (124 on timeout) and output."""
    try:
        done = subprocess.run(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        code, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or ""
        code, output = 124, (out.decode(errors="replace") if isinstance(out, bytes) else out) + \
            f"\nTIMEOUT after {timeout:.0f} s"
    log.write_text("$ " + " ".join(command) + "\n" + output)
    return code, output


VERSIONS = ("import json, platform\nfrom importlib import metadata\nfound = {'python': platform.python_version()}\n"
            "for name in %r:\n    try:\n        found[name] = metadata.version(name)\n"
            "    except metadata.PackageNotFoundError:\n        found[name] = '-'\nprint(json.dumps(found))\n"
            % (REPORTED,))


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """``passed``, ``failed``, ``errors``, ``skipped`` from pytest's JUnit XML, and every failure or error, in order, as
    ``test: exception line``."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        message = (bad.get("message") or "").strip().splitlines()
        line = message[0] if message else ""
        if line.startswith("assert") and len(message) > 1:  # "assert False" says little: add pytest's "where ..."
            line = f"{line}, {' '.join(message[1].split()).lstrip('+ ')}"[:160]
        if not line or line == "collection failure" or line.startswith(("failed on setup", "failed on teardown")):
            line = last_line(bad.text or "", "E ")[1:].strip() or line
        test = "::".join(filter(None, [case.get("classname", "").split(".")[-1], case.get("name", "")]))
        failures.append(f"{test}: {line}")
    result = {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
              "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"]}
    return result, failures


def run_config(config: Config, python: Optional[tuple[str, str]], lines: list[str], source: Path, workdir: Path,
               args: argparse.Namespace) -> dict[str, object]:
    """Build the configuration's environment, install the snapshot, run TESTS: one table row, as a dict."""
    row: dict[str, object] = {"config": config.name, "python": python[1] if python else "-",
                              **{name: "-" for name in REPORTED}, "passed": "-", "failed": "-", "errors": "-",
                              "skipped": "-", "install_s": "-", "test_s": "-", "first": "", "failures": [],
                              "ok": False}
    if python is None:
        row["first"] = f"no python: no Python {config.python} found here"
        return row
    folder = workdir / config.name
    folder.mkdir(parents=True, exist_ok=True)
    venv = folder / "venv"
    constraint_file = folder / "constraints.txt"
    constraint_file.write_text("".join(line + "\n" for line in lines))
    env = child_env(venv, args.threads, workdir / "pip-cache", constraint_file)
    py = str(venv / "bin" / "python")
    start = time.perf_counter()
    print(f"[{config.name}] Python {python[1]} ({python[0]}), constraints: {', '.join(lines) or 'none'}", flush=True)
    code, output = run_logged([python[0], "-m", "venv", "--clear", str(venv)], folder / "venv.log", env, folder, 600)
    if code == 0:
        print(f"[{config.name}] pip install {source.name}[test] ...", flush=True)
        code, output = run_logged([py, "-m", "pip", "install", f"{source}[test]"], folder / "install.log", env,
                                  folder, args.install_timeout)
    row["install_s"] = f"{time.perf_counter() - start:.0f}"
    try:
        if code != 0:
            row["first"] = "install failed: " + (last_line(output, "ERROR:") or last_line(output))
            return row
        done = subprocess.run([py, "-c", VERSIONS], env=env, capture_output=True, text=True, timeout=120)
        row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"[{config.name}] installed " + ", ".join(f"{n} {row[n]}" for n in ("python", *REPORTED))
              + f"; running {len(TESTS)} test files ...", flush=True)
        junit = folder / "junit.xml"
        junit.unlink(missing_ok=True)
        start = time.perf_counter()
        code, output = run_logged([py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
                                   *TESTS], folder / "tests.log", env, source, args.test_timeout)
        row["test_s"] = f"{time.perf_counter() - start:.0f}"
        if not junit.exists():
            row["first"] = f"pytest exited {code} with no report: " + last_line(output)
            return row
        counts, failures = junit_counts(junit)
        row.update(counts, first=failures[0] if failures else "", failures=failures)
        row["ok"] = code == 0 and counts["failed"] == 0 and counts["errors"] == 0
        if code != 0 and not failures:
            row["first"] = f"pytest exited {code}: " + last_line(output)
        return row
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


def parse_custom(spec: str) -> Config:
    """``python=3.9,torch=2.3[,lightning=2.4][,torchmetrics=1.4][,extra=numpy<2][,name=NAME]``: unnamed packages
    take ``declared``, the Python ``lowest``."""
    values: dict[str, str] = {}
    extra: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("python", "name", "extra", *PINNED):
            raise argparse.ArgumentTypeError(f"--custom {spec!r}: {part!r} is not KEY=VALUE with KEY in "
                                             f"python, name, extra, {', '.join(PINNED)}")
        if key == "extra":
            extra.append(value)
        else:
            values[key] = value
    pins = {name: values.get(name, "declared") for name in PINNED}
    name = values.get("name") or "custom-" + "-".join(
        f"{key}{values[key]}" for key in ("python", *PINNED) if key in values)
    return Config(name, values.get("python", "lowest"), pins, tuple(extra), note=f"--custom {spec}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    names = [config.name for config in CONFIGS]
    parser.add_argument("--configs", default="all",
                        help=f"comma-separated, of {', '.join(names)}; 'all' (default) or 'none' (with --custom)")
    parser.add_argument("--custom", action="append", default=[], type=parse_custom, metavar="SPEC",
                        help="one more configuration, e.g. python=3.9,torch=2.3,lightning=2.4,torchmetrics=1.3 "
                             "(each package: a minor version, 'declared' (the default) or 'latest'; python: X.Y, "
                             "'lowest' (the default) or 'newest'; also extra=CONSTRAINT, name=NAME); repeatable")
    parser.add_argument("--workdir", default="",
                        help="where the environments, logs and pip's cache go (default: a temporary folder, deleted "
                             "at the end unless --keep); never inside the repository")
    parser.add_argument("--source", default="HEAD",
                        help="what is tested: a git revision (default HEAD: the last commit, not the edits in "
                             "progress) or 'worktree' (the working tree as it is)")
    parser.add_argument("--keep", action="store_true", help="keep the virtual environments (and a temporary workdir)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the tests (default 1)")
    parser.add_argument("--install-timeout", type=float, default=1800, help="seconds per install (default 1800)")
    parser.add_argument("--test-timeout", type=float, default=1200, help="seconds per test run (default 1200)")
    parser.add_argument("--list", action="store_true", help="print what each configuration resolves to and stop")
    parser.add_argument("--out", default=str(RESULTS), help=f"where versions.md goes (default {RESULTS}; '' for "
                                                             "nowhere)")
    args = parser.parse_args(argv)

    selected = list(CONFIGS) if args.configs == "all" else [] if args.configs == "none" else None
    if selected is None:
        wanted = [name.strip() for name in args.configs.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(names)}")
        selected = [config for config in CONFIGS if config.name in wanted]
    selected += args.custom
    if not selected:
        parser.error("no configuration selected")

    requires, dependencies = read_pyproject(REPO)
    pythons = pythons_here(requires)
    plan = [(config, resolve_python(config, pythons), constraints(config, dependencies)) for config in selected]
    print(f"requires-python {requires!r}; Pythons found: "
          + ", ".join(f"{version} ({path})" for path, version in pythons.values()))
    for config, python, lines in plan:
        print(f"  {config.name}: Python {python[1] if python else config.python + ' (not found)'}, constraints: "
              f"{', '.join(lines) or 'none'}{'  -- ' + config.note if config.note else ''}")
    if args.list:
        return 0

    from benchmarks._harness import cpu_model, format_table, write_report

    temporary = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="multimix-versions-")).resolve()
    if workdir == REPO or REPO in workdir.parents:
        parser.error(f"--workdir {workdir} is inside the repository: give one outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": str(os.cpu_count()), "load_avg_1m": f"{os.getloadavg()[0]:.2f}", "os": sys.platform,
            "pythons": ", ".join(version for _, version in pythons.values())}
    source = workdir / "src"
    copied = snapshot(REPO, source, args.source)
    print(f"workdir {workdir}; source: {copied}")
    started = time.perf_counter()
    rows = []
    try:
        for config, python, lines in plan:
            row = run_config(config, python, lines, source, workdir, args)
            rows.append(row)
            print(f"[{config.name}] {'passed' if row['ok'] else 'FAILED'}: {row['passed']} passed, {row['failed']} "
                  f"failed, {row['errors']} errors, {row['skipped']} skipped; {row['first']}", flush=True)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - started

    headers = ("configuration", "result", "python", *REPORTED, "passed", "failed", "errors", "skipped", "install s",
               "tests s", "first failure")
    table = format_table(headers, [[row["config"], "pass" if row["ok"] else "FAIL", row["python"],
                                    *(row[n] for n in REPORTED), row["passed"], row["failed"], row["errors"],
                                    row["skipped"], row["install_s"], row["test_s"],
                                    shorten(str(row["first"]) or "-", 100)] for row in rows],
                         title=f"== the core and callback tests ({len(TESTS)} files) per configuration, "
                               f"{args.threads} thread(s) ==")
    asked = "\n".join(f"  {config.name}: Python {config.python}, constraints "
                      f"{', '.join(lines) or 'none (the newest releases)'}{'; ' + config.note if config.note else ''}"
                      for config, _, lines in plan)
    failed = "\n".join(f"  {row['config']}:\n" + "\n".join(f"    {line}" for line in row["failures"][:10])
                       + (f"\n    ... ({len(row['failures'])} in all)" if len(row["failures"]) > 10 else "")
                       for row in rows if row["failures"])
    body = (f"{table}\n\nasked for:\n{asked}\n" + (f"every failure:\n{failed}\n" if failed else "")
            + f"tests: {' '.join(TESTS)}\ntotal: {total:.0f} s")
    print("\n" + body + "\n")
    settings = (f"source {copied}; requires-python {requires!r}; pip install SNAPSHOT[test] in a new venv per "
                f"configuration, pins as pip constraints; {args.threads} thread(s); one configuration at a time")
    write_report(args.out, "versions.md", info, settings, body)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
