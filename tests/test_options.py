"""Each option is declared once (``MultiMixOptions``): the callback's signature, its docstring and the README's table
are made from the declaration, and the README's copy of the table is the one the declaration makes."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from lightning_multimix import MultiMix
from lightning_multimix.options import MultiMixOptions, options_table

FIELDS = dataclasses.fields(MultiMixOptions)


def test_the_readme_table_is_the_declared_one():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert options_table() in readme, "regenerate the README's table: python -c 'from lightning_multimix.options " \
                                      "import options_table; print(options_table())'"


def test_the_signature_docstring_and_attributes_follow_the_declaration():
    params = list(inspect.signature(MultiMix).parameters.values())
    assert [(p.name, p.default, p.kind) for p in params] == [(f.name, f.default, inspect.Parameter.KEYWORD_ONLY)
                                                             for f in FIELDS]
    args = MultiMix.__doc__.split("Args:")[1]
    entries = [line.strip().split(":")[0] for line in args.splitlines() if re.match(r" {8}\w+: ", line)]
    assert entries == [f.name for f in FIELDS]
    callback = MultiMix(n_tuples=7, dense=None)
    assert all(getattr(callback, f.name) == getattr(callback.options, f.name) for f in FIELDS)
    assert callback.n_tuples == 7 and MultiMix().n_tuples == 1000 and MultiMix(mode="pairs").n_tuples is None


def test_an_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"\['n_tuple'\]"):
        MultiMix(n_tuple=10)
