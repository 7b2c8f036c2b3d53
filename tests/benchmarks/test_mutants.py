"""The mutation check stays current: every mutant's snippet occurs exactly once in its file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "trajflow_benchmark_mutants", ROOT / "benchmarks" / "mutants.py"
)
mutants = importlib.util.module_from_spec(spec)
sys.modules["trajflow_benchmark_mutants"] = mutants  # dataclasses look their module up
spec.loader.exec_module(mutants)


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_once_and_names_existing_tests(mutant):
    assert (ROOT / mutant.path).read_text().count(mutant.before) == 1, mutant.name
    assert mutant.before != mutant.after
    assert all((ROOT / test).exists() for test in mutant.tests)
