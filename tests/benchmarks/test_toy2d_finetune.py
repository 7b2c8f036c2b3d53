"""The finetuning sweep trains the recipe it reports, and compares against the right FM."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trajflow import NTM

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "toy2d_finetune.py"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("toy2d_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_toy2d_recipe(sweep):
    toy2d = sweep.toy2d
    assert sweep.recipe() == {
        "pretrain_fraction": toy2d.PRETRAIN_FRACTION,
        "aux_weight": toy2d.AUX_WEIGHT,
        "transporter_layers": toy2d.TRANSPORTER_LAYERS,
        "transporter_hidden": toy2d.TRANSPORTER_HIDDEN,
        "transporter_bins": 8,
        "finetune_lr": toy2d.LR,
        "grid_shift": 0.0,
        "mode": "pairwise",
        "train_steps": toy2d.TRAIN_STEPS,
    }
    assert sweep.changes(sweep.recipe()) == "toy2d.py recipe"
    changed = sweep.recipe(aux_weight=0.0, transporter_hidden=[128, 128])
    assert sweep.changes(changed) == "aux_weight=0.0, transporter_hidden=[128, 128]"


def test_every_setting_reaches_the_model_and_its_training(sweep, monkeypatch):
    """Spies on toy2d.fit: the phases' budgets, the finetuning lr and the built NTM."""
    toy2d = sweep.toy2d
    calls = []

    def spy_fit(model, dataset, iterations, seed, lr=None):
        calls.append((model, iterations, lr))
        return model, model.eval()

    monkeypatch.setattr(toy2d, "fit", spy_fit)
    result = sweep.run(
        "two_moons", iters=40, eval_points=50, pretrain_fraction=0.25, aux_weight=0.5,
        transporter_layers=3, transporter_hidden=[8], transporter_bins=5, finetune_lr=1e-4,
        grid_shift=-0.5, mode="end_to_end", train_steps=[8, 4],
    )  # fmt: skip
    (_, pretrain, fm_lr), (ntm, finetune, ft_lr), (_, fm_iters, _) = calls
    assert (pretrain, finetune, fm_iters) == (10, 30, 40)
    assert fm_lr is None and ft_lr == 1e-4  # pretraining keeps toy2d's rate
    assert isinstance(ntm, NTM) and ntm.aux_weight == 0.5 and ntm.aux_steps == 30
    assert ntm.mode == "end_to_end"
    assert ntm.schedule.steps == [4, 8] and result["settings"]["recipe"]["train_steps"] == [4, 8]
    assert len(ntm.transporter) == 3
    assert ntm.transporter[0].conditioner[0].out_features == 8  # hidden width [8]
    assert {block.bins for block in ntm.transporter} == {5}
    assert result["settings"]["recipe"]["transporter_hidden"] == [8]
    # μ = -0.5 puts the levels of T = 4 closer to the data: about 0.168, 0.378, 0.645, 1.
    assert (ntm.schedule.grid, ntm.schedule.shift) == ("shifted", -0.5)
    levels = ntm.grid(4, torch.tensor([1e-3]))[0, 1:]
    shift, k = torch.tensor(-0.5).exp(), torch.arange(1, 5)
    expected = (shift / (shift + 4 / k - 1)).to(levels.dtype)
    assert torch.allclose(levels, expected, atol=1e-4)
    assert result["flow_matching"]["source"] == "trained here"


def test_scores_are_means_over_sampling_seeds_and_ratios_follow(sweep, monkeypatch):
    monkeypatch.setattr(sweep.toy2d, "BATCH", 64)  # a smoke run: the budget's shape only
    result = sweep.run("eight_gaussians", iters=4, eval_points=200, aux_weight=1.0)
    sw = result["finetuned"]["sliced_wasserstein"]
    per_seed = result["finetuned"]["sliced_wasserstein_per_sample_seed"]
    assert set(sw) == {"2", "4", "8"}
    for steps, values in per_seed.items():
        assert len(values) == sweep.toy2d.SAMPLE_SEEDS
        assert sw[steps] == pytest.approx(sum(values) / len(values))
    fm = result["flow_matching"]
    assert fm["sliced_wasserstein"] == pytest.approx(sum(fm["per_sample_seed"]) / 3)
    ratio, steps = result["targets"]
    assert ratio["value"] == pytest.approx(sw["4"] / fm["sliced_wasserstein"])
    assert steps["value"] == pytest.approx(sw["8"] / sw["4"])
    assert result["settings"]["changed"] == "aux_weight=1.0"
    assert "aux_weight=1.0" in sweep.summary_table([result])


def test_fm_reference_must_match_dataset_seed_and_budget(sweep, tmp_path, monkeypatch):
    reference = {
        "dataset": "spirals", "seed": 0, "settings": {"iterations": 2000},
        "records": [{"method": "flow_matching", "steps": 100, "sliced_wasserstein": 0.035}],
    }  # fmt: skip
    path = tmp_path / "toy2d_spirals.json"
    path.write_text(json.dumps(reference))
    assert sweep.fm_reference(path, "spirals", 0, 2000) == 0.035
    for dataset, seed, iters in (("two_moons", 0, 2000), ("spirals", 1, 2000), ("spirals", 0, 9)):
        with pytest.raises(ValueError, match=r"toy2d_spirals\.json: expected"):
            sweep.fm_reference(path, dataset, seed, iters)
    path.write_text(json.dumps({"dataset": "spirals", "seed": 0}))  # not a toy2d.py result
    with pytest.raises(ValueError, match="it holds dataset='spirals', seed=0, iterations=None"):
        sweep.fm_reference(path, "spirals", 0, 2000)
    path.write_text(json.dumps({**reference, "records": []}))
    with pytest.raises(ValueError, match="no flow_matching record with 100 steps"):
        sweep.fm_reference(path, "spirals", 0, 2000)
    path.write_text(json.dumps(reference))
    # A wrong reference fails before any training.
    monkeypatch.setattr(sweep.toy2d, "finetuned_ntm", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="dataset='two_moons'"):
        sweep.run("two_moons", iters=2000, fm_from=path)


def test_pretraining_fraction_is_validated(sweep):
    with pytest.raises(ValueError, match=r"pretraining fraction in \(0, 1\), got 1.0"):
        sweep.toy2d.finetuned_ntm("two_moons", 10, 0, pretrain_fraction=1.0)


def test_a_grid_too_close_to_the_data_fails_before_training(sweep, monkeypatch):
    """μ = -1 puts t_1 of T = 8 at 0.0499, below t_min_high = 0.05: an error, not a crash."""
    monkeypatch.setattr(sweep.toy2d, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"t_min_high .* must lie below t_1 = 0\.04993"):
        sweep.run("two_moons", iters=10, grid_shift=-1.0)


def test_an_unknown_mode_fails_before_training(sweep, monkeypatch):
    monkeypatch.setattr(sweep.toy2d, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"mode\s+Input should be 'end_to_end' or 'pairwise'"):
        sweep.run("two_moons", iters=10, mode="every_pair")


def test_a_bad_step_set_fails_before_training(sweep, monkeypatch):
    monkeypatch.setattr(sweep.toy2d, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"steps must be a non-empty list of positive integers"):
        sweep.run("two_moons", iters=10, train_steps=[0, 4])


def test_variants_are_runs_of_the_recipe(sweep, tmp_path, monkeypatch, capsys):
    for name, arguments in sweep.VARIANTS.items():
        settings = {key: value for key, value in arguments.items() if key != "iters"}
        assert set(settings) <= set(sweep.recipe()), name
        assert (sweep.changes(sweep.recipe(**settings)) == "toy2d.py recipe") == (not settings)
    monkeypatch.setattr(sweep.toy2d, "BATCH", 32)
    monkeypatch.setattr(sweep.toy2d, "ITERATIONS", 3)
    monkeypatch.setattr(sweep.toy2d, "EVAL_POINTS", 200)
    out = tmp_path / "aux0.json"
    result = sweep.main(["--dataset", "two_moons", "--variant", "aux0", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["variant"] == "aux0"
    assert result["settings"]["recipe"]["aux_weight"] == 0.0
    assert "NTM-FT T=4 SW / FM Euler 100 SW" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a variant and a conflicting flag
        sweep.main(["--variant", "aux0", "--aux-weight", "1", "--out", str(out)])
    assert "drop ['aux_weight']" in capsys.readouterr().err


def test_data_floor_is_the_metric_between_two_draws_of_the_data(sweep):
    floor = sweep.data_floor("two_moons", 0, 2000)
    test = sweep.sample_dataset("two_moons", 2000, seed=10_000)
    shifted = sweep.sample_dataset("two_moons", 2000, seed=20_000) + 0.1
    projections = torch.Generator().manual_seed(1)
    assert 0 < floor < sweep.sliced_wasserstein(shifted, test, generator=projections)


def test_summary_lists_each_run_and_plots_them(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.toy2d, "BATCH", 32)
    paths = []
    for name, aux in (("a.json", 0.0), ("b.json", 1.0)):
        result = sweep.run("two_moons", iters=2, eval_points=100, aux_weight=aux)
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(result))
    png = tmp_path / "sweep.png"
    sweep.main(["--summarize", *map(str, paths), "--plot", str(png)])
    table = capsys.readouterr().out
    assert "aux_weight=0.0" in table and "aux_weight=1.0" in table and "data floor" in table
    assert png.stat().st_size > 0


def test_the_results_page_shows_the_committed_sweep(sweep):
    """The tables on the toy results page are the summaries of the committed JSON files."""
    root = SCRIPT.parents[1]
    page = (root / "docs" / "toy_results.md").read_text()
    results = root / "benchmarks" / "results"
    tables = {
        dataset: sorted(results.glob(f"toy2d_finetune_{dataset}_*.json"))
        for dataset in ("checkerboard", "spirals")
    }
    # The whole sweep of make bench-toy-finetune on checkerboard.
    variants = {path.stem.split("checkerboard_")[1] for path in tables["checkerboard"]}
    assert variants == set(sweep.VARIANTS)
    # The end-to-end variant on every dataset ...
    tables["end_to_end"] = sorted(results.glob("toy2d_finetune_*_e2e.json"))
    found = {
        path.stem.removeprefix("toy2d_finetune_").removesuffix("_e2e")
        for path in tables["end_to_end"]
    }
    assert found == {"checkerboard", "eight_gaussians", "pinwheel", "spirals", "two_moons"}
    # ... and with T drawn from {4, 8} only.
    tables["steps4-8"] = sorted(results.glob("toy2d_finetune_*_e2e_steps4-8.json"))
    assert len(tables["steps4-8"]) == len(found)
    for name, files in tables.items():
        runs = [json.loads(path.read_text()) for path in reversed(files)]  # any file order
        assert sweep.summary_table(runs) in page, name


def test_make_target_runs_every_variant(sweep):
    makefile = (SCRIPT.parents[1] / "Makefile").read_text()
    (line,) = [line for line in makefile.splitlines() if line.startswith("FT_VARIANTS =")]
    # budget2x has its own line: it trains its FM reference instead of reading bench-toy's.
    assert [*line.split("=")[1].split(), "budget2x"] == list(sweep.VARIANTS)
    assert "--variant budget2x" in makefile
