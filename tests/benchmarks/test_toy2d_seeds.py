"""The training-seed benchmark reproduces toy2d's NTM rows and summarises the seeds honestly."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds_module():
    return load("toy2d_seeds")


def test_each_seed_reproduces_the_ntm_rows_of_toy2d(seeds_module, monkeypatch):
    toy2d = seeds_module.toy2d
    monkeypatch.setattr(toy2d, "BATCH", 128)  # a smoke run: the budget's shape, not its size
    result = seeds_module.run("two_moons", [1], iters=3, eval_points=300)
    reference = toy2d.run("two_moons", seed=1, iters=3, eval_points=300)
    (record,) = result["records"]
    for steps in seeds_module.STEPS:
        row = next(r for r in reference["records"] if r["method"] == "ntm" and r["steps"] == steps)
        assert record["sliced_wasserstein"][str(steps)] == pytest.approx(
            row["sliced_wasserstein"], rel=1e-6
        )


def test_summary_is_computed_from_the_seeds(seeds_module, monkeypatch):
    monkeypatch.setattr(seeds_module.toy2d, "BATCH", 64)
    result = seeds_module.run("eight_gaussians", [0, 1, 2], iters=2, eval_points=200)
    records, summary = result["records"], result["summary"]
    assert [r["seed"] for r in records] == [0, 1, 2]
    # Different training seeds train different models.
    assert len({r["sliced_wasserstein"]["4"] for r in records}) == 3
    for record in records:
        sw = record["sliced_wasserstein"]
        assert record["ratio_8_4"] == pytest.approx(sw["8"] / sw["4"])
        per_sample_seed = record["sliced_wasserstein_per_sample_seed"]["8"]
        assert len(per_sample_seed) == seeds_module.toy2d.SAMPLE_SEEDS
        assert sw["8"] == pytest.approx(statistics.fmean(per_sample_seed))
    ratios = [r["ratio_8_4"] for r in records]
    assert summary["ratio_8_4_mean"] == pytest.approx(statistics.fmean(ratios))
    assert summary["ratio_8_4_stdev"] == pytest.approx(statistics.stdev(ratios))
    assert summary["seeds_meeting_8_le_4"] == sum(ratio <= 1 for ratio in ratios)
    means = summary["sliced_wasserstein_mean"]
    assert summary["ratio_of_means_8_4"] == pytest.approx(means["8"] / means["4"])
    (target,) = result["targets"]
    assert target["value"] == summary["ratio_of_means_8_4"]
    assert target["passed"] == (target["value"] <= 1)
    table = seeds_module.summary_table([result])
    assert "eight_gaussians" in table and "of 3" in table


@pytest.mark.parametrize("seeds", [[], [0, 0]])
def test_seeds_must_be_distinct_and_given(seeds_module, seeds):
    with pytest.raises(ValueError, match="distinct training seeds"):
        seeds_module.run("two_moons", seeds, iters=1, eval_points=10)


def test_unknown_dataset_is_refused(seeds_module):
    with pytest.raises(KeyError, match="not_a_dataset"):
        seeds_module.run("not_a_dataset", [0], iters=1, eval_points=10)


def test_the_x0_regression_weight_reaches_the_model_and_the_json(
    seeds_module, monkeypatch, tmp_path
):
    toy2d = seeds_module.toy2d
    monkeypatch.setattr(toy2d, "BATCH", 64)
    built, fit = [], toy2d.fit

    def spy(model, *args, **kwargs):
        built.append(model.x0_mse_weight)
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(toy2d, "fit", spy)
    out = tmp_path / "seeds.json"
    argv = ["--dataset", "two_moons", "--seeds", "0", "--iters", "2", "--x0-mse-weight", "0.5"]
    monkeypatch.setattr(toy2d, "EVAL_POINTS", 100)
    result = seeds_module.main([*argv, "--out", str(out)])
    assert built == [0.5]
    assert result["settings"]["x0_mse_weight"] == 0.5
    assert out.exists()
    seeds_module.run("two_moons", [0], iters=1, eval_points=50)
    assert built == [0.5, 0.0]  # the default is the toy2d.py NTM, pure NLL


def test_the_trained_step_counts_and_mode_reach_the_model_and_the_json(
    seeds_module, monkeypatch, tmp_path
):
    toy2d = seeds_module.toy2d
    monkeypatch.setattr(toy2d, "BATCH", 64)
    monkeypatch.setattr(toy2d, "EVAL_POINTS", 100)
    built, fit = [], toy2d.fit

    def spy(model, *args, **kwargs):
        built.append((list(model.schedule.steps), model.mode))
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(toy2d, "fit", spy)
    argv = ["--dataset", "two_moons", "--seeds", "0", "--iters", "2", "--train-steps", "8", "4"]
    result = seeds_module.main([*argv, "--mode", "end_to_end", "--out", str(tmp_path / "s.json")])
    assert built == [([4, 8], "end_to_end")]
    assert result["settings"]["train_steps"] == [4, 8]
    assert result["settings"]["mode"] == "end_to_end"
    # Sampled at every T of STEPS, trained or not.
    assert set(result["records"][0]["sliced_wasserstein"]) == {str(s) for s in seeds_module.STEPS}
    seeds_module.run("two_moons", [0], iters=1, eval_points=50)
    assert built[-1] == (toy2d.TRAIN_STEPS, "pairwise")  # the default is the toy2d.py NTM


def test_a_bad_step_set_fails_before_training(seeds_module, monkeypatch):
    toy2d = seeds_module.toy2d
    monkeypatch.setattr(toy2d, "fit", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(ValueError, match="steps"):
        seeds_module.run("two_moons", [0], iters=1, eval_points=10, train_steps=[0, 4])


def test_the_summary_names_what_each_run_changed(seeds_module):
    toy2d = seeds_module.toy2d
    default = {"x0_mse_weight": 0.0, "train_steps": toy2d.TRAIN_STEPS, "mode": "pairwise"}
    assert seeds_module.changes(default) == "toy2d.py NTM"
    assert seeds_module.changes({"x0_mse_weight": 0.0}) == "toy2d.py NTM"  # an older result
    changed = {"x0_mse_weight": 1.0, "train_steps": [4, 8], "mode": "end_to_end"}
    assert seeds_module.changes(changed) == "x̂₀ term 1, T ∈ {4, 8}, end-to-end"


DATASETS = ["checkerboard", "eight_gaussians", "pinwheel", "spirals", "two_moons"]
#: Each seeds table on the toy results page, as the result files it summarises, in order.
PAGE_TABLES = {
    prefix: [f"{prefix}_{name}" for name in DATASETS]
    for prefix in ("toy2d_seeds", "toy2d_seeds_x0mse1", "toy2d_seeds_steps4-8")
} | {
    "steps4-8 one-offs": [
        "toy2d_seeds_x0mse1_steps4-8_spirals",
        *(f"toy2d_seeds_e2e_steps4-8_two_moons_seed{seed}" for seed in range(3)),
    ]
}


@pytest.mark.parametrize("table", list(PAGE_TABLES))
def test_the_results_page_shows_the_committed_seeds(seeds_module, table):
    """Each seeds table on the toy results page is the summary of its committed JSONs."""
    results = ROOT / "benchmarks" / "results"
    runs = [json.loads((results / f"{name}.json").read_text()) for name in PAGE_TABLES[table]]
    page = (ROOT / "docs" / "toy_results.md").read_text()
    assert seeds_module.summary_table(runs) in page
