"""The architecture, checked: the tensor core imports no Lightning, the library imports nothing from the demo, and
no library file grows past the size where it stops having one job."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_multimix"
CORE = ("sampling", "interpolation", "targets", "dense", "positions", "objective", "options", "errors")
LIBRARY = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_list_is_the_documented_one():
    assert set(CORE) <= set(LIBRARY)


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_lightning(module):
    imports = imported_modules(PACKAGE / f"{module}.py")
    assert not {name for name in imports if name.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics")}
    local = {name.split(".")[1] for name in imports if name.startswith("lightning_multimix.")}
    assert local <= set(CORE), f"{module} imports the Lightning layer: {local - set(CORE)}"


@pytest.mark.parametrize("module", ["__init__", *LIBRARY])
def test_library_imports_nothing_from_the_demo(module):
    imports = imported_modules(PACKAGE / f"{module}.py")
    assert not {name for name in imports if name.startswith("lightning_multimix.demo")}


def test_at_run_time_the_core_loads_no_lightning_and_the_package_no_demo():
    """Imported for real in a fresh interpreter (the static check above would miss a dynamic import)."""
    code = (
        "import importlib, sys, types\n"
        # the package's __init__ imports the callback (Lightning): load the core modules without running it
        f"stub = types.ModuleType('lightning_multimix'); stub.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['lightning_multimix'] = stub\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('lightning_multimix.' + name)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')], 'core'\n"
        "for name in [m for m in sys.modules if m.startswith('lightning_multimix')]:\n"
        "    del sys.modules[name]\n"
        "import lightning_multimix\n"
        "assert not [m for m in sys.modules if m.startswith('lightning_multimix.demo')], 'demo'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("module", LIBRARY)
def test_no_library_file_over_350_lines(module):
    lines = len((PACKAGE / f"{module}.py").read_text().splitlines())
    assert lines <= 350, f"{module}.py has {lines} lines: split it by job"
