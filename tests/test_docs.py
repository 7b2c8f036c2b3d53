"""The docs stay true: their example scripts run, and every registered block is documented.

``mkdocs build --strict`` (run by ``make test``) catches broken links, snippets and docstrings;
these tests catch docs whose code no longer runs or that miss a block.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

from trajflow import BLOCKS
from trajflow.blocks import Coupling

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', flags=re.MULTILINE)
MANGLED = re.compile(r"^\s*-+8 +< +-+")


@pytest.fixture
def one_thread():
    """The examples train tiny models: one thread is faster, and on a loaded machine much so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_custom_block_tutorial_registers_checks_and_trains(one_thread):
    namespace = runpy.run_path(str(DOCS / "examples" / "custom_block.py"))
    name = namespace["NAME"]
    assert name in BLOCKS
    assert issubclass(BLOCKS.get(name), Coupling)

    for report in (namespace["check"](), namespace["check_scratch"]()):
        errors = [getattr(report, field) for field in report.__dataclass_fields__]
        assert max(errors) < 1e-12, report

    before, after = namespace["train"]()
    assert after > before + 0.2, (before, after)

    block = BLOCKS.build({"name": name, "kwargs": {"features": 4, "hidden_features": [8]}})
    assert block(torch.randn(3, 4))[0].shape == (3, 4)


def test_the_custom_block_script_can_run_twice_in_one_process(one_thread):
    path = str(DOCS / "examples" / "custom_block.py")
    first, second = runpy.run_path(path), runpy.run_path(path)
    assert first["NAME"] == second["NAME"] in BLOCKS


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_script_runs(path, one_thread):
    runpy.run_path(str(path), run_name="__main__")


def _library_block_names() -> list[str]:
    """Registered names of trajflow's own blocks (not those a docs example registered)."""
    return [name for name in BLOCKS.names() if BLOCKS.get(name).__module__.startswith("trajflow")]


def test_every_registered_block_has_a_section_in_the_block_catalogue():
    lines = (DOCS / "blocks.md").read_text().splitlines()
    headings = [line for line in lines if line.startswith("#")]
    documented = {name for line in headings for name in re.findall(r"`([a-z0-9_]+)`", line)}
    missing = sorted(set(_library_block_names()) - documented)
    assert not missing, f"blocks without a heading in docs/blocks.md: {missing}"


def test_snippets_point_at_existing_files_and_sections():
    found = 0
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        # ruff format (0.16+) rewrites `--8<-- "f"` in python fences to `--8 < --"f"`, which
        # mkdocs then shows as code instead of including the file.
        mangled = [line for line in text.splitlines() if MANGLED.match(line)]
        assert not mangled, f"{page.name}: snippet lines rewritten by a formatter: {mangled}"
        for target in SNIPPET.findall(text):
            found += 1
            file, _, section = target.partition(":")
            source = ROOT / file
            assert source.is_file(), f"{page.name}: missing snippet file {file}"
            if section:
                code = source.read_text()
                for marker in (f"[start:{section}]", f"[end:{section}]"):
                    assert marker in code, f"{page.name}: {file} has no {marker}"
    assert found >= 10, "the pages include their examples with pymdownx.snippets"


def test_the_spline_figure_script_runs(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    namespace = runpy.run_path(str(DOCS / "scripts" / "plot_spline.py"))
    namespace["main"].__globals__["OUT"] = tmp_path / "spline.png"
    assert namespace["main"]().stat().st_size > 10_000
