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


# --------------------------------------------------------------------------- NTM pages
JSON_BLOCK = re.compile(r"^```json\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)


def test_compose_ntm_tutorial_trains_samples_evaluates_and_reloads(one_thread):
    ns = runpy.run_path(str(DOCS / "examples" / "compose_ntm.py"))
    # The model built in Python and the one built from its JSON config are the same.
    assert ns["SAME_AS_CONFIG"]
    # Training improves the 4-step samples a lot, and the 2-step samples are usable too.
    assert ns["SW_AFTER"] < 0.5 * ns["SW_BEFORE"], (ns["SW_BEFORE"], ns["SW_AFTER"])
    assert ns["SW_AFTER"] < 0.3 and ns["SW_AFTER_T2"] < 0.5, (ns["SW_AFTER"], ns["SW_AFTER_T2"])
    # The data bound improves and says which variable it is about.
    assert ns["BITS_AFTER"] < ns["BITS_BEFORE"], (ns["BITS_BEFORE"], ns["BITS_AFTER"])
    assert "t0 = 0.001" in ns["bound"].variable and "T = 4" in ns["bound"].variable
    # The exact trajectory log-density: one finite value per test point, over T + 1 levels.
    assert ns["trajectory"].shape == (len(ns["TEST"]), 5, 2)
    assert ns["log_p"].shape == (len(ns["TEST"]),) and torch.isfinite(ns["log_p"]).all()
    # A reloaded checkpoint samples exactly like the model it was saved from.
    assert ns["SAME_AFTER_RELOAD"] and ns["state"].step == 200
    # Initialised from flow matching, the NTM is FM's ancestral sampler (up to float32).
    assert ns["FINETUNE_GAP"] < 1e-4, ns["FINETUNE_GAP"]
    assert all(0 < value < 2 for value in ns["SW_FM"].values()), ns["SW_FM"]


def test_the_json_examples_of_the_training_page_are_valid_configs():
    from trajflow.config import ModelConfig, toy_ntm_config
    from trajflow.train import TrainConfig

    model_json, train_json = JSON_BLOCK.findall((DOCS / "training.md").read_text())
    expected = toy_ntm_config(predictor_hidden=[64, 64], transporter_layers=2)
    assert ModelConfig.model_validate_json(model_json) == expected
    assert model_json.strip() == expected.model_dump_json(indent=2)
    assert TrainConfig.model_validate_json(train_json).ema_decay == 0.999


def test_the_ntm_quick_example_of_the_home_page_runs(one_thread, capsys):
    text = (DOCS / "index.md").read_text()
    blocks = [block for block in PYTHON_BLOCK.findall(text) if "toy_ntm_config" in block]
    assert len(blocks) == 1
    # The page trains for 1000 steps; 3 show that the code runs.
    code = blocks[0].replace("iterations=1000", "iterations=3")
    code = code.replace("config=config)", "config=config, progress=False)")
    assert "iterations=3" in code and "progress=False" in code
    exec(compile(code, "docs/index.md", "exec"), {})
    assert "t0 = 0.001, T = 4" in capsys.readouterr().out


def test_the_toy_results_page_keeps_the_marker_for_the_results_table():
    text = (DOCS / "toy_results.md").read_text()
    assert "<!-- toy2d results table -->" in text
    assert "Results are pasted from the JSON files of the last run" in text


def test_the_model_config_shown_in_the_training_guide_is_current():
    """docs/training.md prints a toy config in full: every field a user can set appears."""
    from trajflow.config import toy_ntm_config

    text = (DOCS / "training.md").read_text()
    shown = re.search(r'```json\n(\{\n  "kind": "ntm".*?\n\})\n```', text, flags=re.DOTALL)
    assert shown, "docs/training.md lost its model config example"
    config = toy_ntm_config(predictor_hidden=[64, 64], transporter_layers=2)
    assert shown.group(1) == config.model_dump_json(indent=2)
