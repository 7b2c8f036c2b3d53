"""The toy benchmark's importable run() works on registered and user-registered datasets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trajflow import DATASETS, NTM, FlowMatching
from trajflow.config import toy_ntm_config
from trajflow.schedules import draw_steps

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy2d():
    spec = importlib.util.spec_from_file_location("toy2d", ROOT / "benchmarks" / "toy2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ring_dataset():
    """A user dataset registered with the decorator, removed again after the test."""

    @DATASETS.register("test_ring")
    def ring(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        angle = 2 * torch.pi * torch.rand(n, generator=generator)
        return 1.5 * torch.stack([angle.cos(), angle.sin()], dim=1)

    yield "test_ring"
    DATASETS._entries.pop("test_ring")


def test_run_reports_every_method_and_target(toy2d, ring_dataset, monkeypatch):
    monkeypatch.setattr(toy2d, "BATCH", 128)  # a smoke run: the budget's shape, not its size
    result = toy2d.run(ring_dataset, seed=0, iters=3, eval_points=300)
    assert result["settings"]["batch_size"] == 128
    methods = {(r["method"], r["steps"]) for r in result["records"]}
    assert {("ntm", t) for t in (1, 2, 4, 8)} <= methods
    assert {("ntm_finetuned", t) for t in (1, 2, 4, 8)} <= methods
    assert {("gaussian_chain", t) for t in (1, 2, 4, 8)} <= methods
    assert {("flow_matching", t) for t in (1, 2, 4, 8, 16, 32, 100)} <= methods
    assert ("nsf", None) in methods
    for record in result["records"]:
        assert record["sliced_wasserstein"] >= 0 and record["train_step_ms"] > 0
        assert record["train_seconds"] > 0
        # Each row is the mean over independent sampling seeds (fresh draws, not one repeated).
        per_seed = record["sliced_wasserstein_per_seed"]
        assert len(per_seed) == toy2d.SAMPLE_SEEDS == result["settings"]["sample_seeds"] == 3
        assert record["sliced_wasserstein"] == pytest.approx(sum(per_seed) / len(per_seed))
        assert len(set(per_seed)) == len(per_seed), record
    bounds = [r["bits_per_dim"] for r in result["records"] if r["bits_per_dim"] is not None]
    assert len(bounds) == 4  # NTM, finetuned NTM and chain at T=4 (bound), NSF (exact)
    names = [target["name"] for target in result["targets"]]
    for label in ("NTM", "NTM-FT"):
        assert f"{label} T=4 SW / FM Euler 100 SW" in names
        assert f"{label} T=4 SW / Gaussian chain T=4 SW" in names
        assert f"{label} T=8 SW / {label} T=4 SW" in names  # more steps never hurt
    assert len(names) == 8
    assert "t0 = 0.001" in result["settings"]["bits_per_dim_variable"]
    assert set(result["panels"]) >= {"data", "ntm T=4", "ntm_finetuned T=4", "FM Euler 100"}
    assert result["dataset"] in toy2d.summary_table([result])


def test_finetuned_row_spends_the_fm_budget(toy2d, monkeypatch):
    """FM pretraining then NTM finetuning: the two phases together take the FM row's steps."""
    calls = []

    def fake_fit(model, dataset, iterations, seed, lr=None):
        assert lr is None  # both phases at the benchmark's learning rate
        calls.append((model, iterations))
        return model, model.eval()

    monkeypatch.setattr(toy2d, "fit", fake_fit)
    model, _ = toy2d.finetuned_ntm("two_moons", 1001, seed=0)
    (fm, pretrain), (ntm, finetune) = calls
    assert isinstance(fm, FlowMatching) and isinstance(ntm, NTM) and ntm is model
    assert pretrain + finetune == 1001 and pretrain == 500
    assert ntm.teacher is not None and ntm.aux_weight == toy2d.AUX_WEIGHT == 2.5
    assert ntm.aux_steps == finetune  # λ decays to 0 over the finetuning
    assert ntm.mode == "pairwise" and len(ntm.transporter) == toy2d.TRANSPORTER_LAYERS
    assert ntm.schedule.steps == toy2d.TRAIN_STEPS
    # It starts as the FM network exactly (the transporter is the identity at first).
    x = torch.randn(16, 1, 2)
    t = torch.rand(16, 1)
    assert torch.allclose(ntm.predictor(x, t)[0], fm.net(x, t)[0], atol=1e-6)


def test_toy_ntm_can_draw_every_transition_equally_often():
    """T ∝ T: a transition of T = 8 is trained as often as one of T = 2 (not a quarter)."""
    assert toy_ntm_config().schedule.steps_weighting == "uniform"  # the measured better default
    schedule = toy_ntm_config(steps_weighting="transitions").schedule
    generator = torch.Generator().manual_seed(0)
    drawn = [draw_steps(schedule.steps, generator, schedule.steps_weighting) for _ in range(2800)]
    for steps in (2, 4, 8):
        assert abs(drawn.count(steps) / len(drawn) - steps / 14) < 0.03, (steps, drawn.count(steps))
    # The NTM's loss draws T this way: its first draw replays draw_steps on the same seed.
    model = toy_ntm_config(
        predictor_hidden=[8], transporter_layers=1, steps_weighting="transitions"
    ).build()
    data = torch.randn(2, 2)
    for seed in range(12):
        expected = draw_steps(schedule.steps, torch.Generator().manual_seed(seed), "transitions")
        assert model.loss(data, generator=torch.Generator().manual_seed(seed)).steps == expected


def test_unknown_dataset_lists_the_known_ones(toy2d):
    with pytest.raises(KeyError, match="checkerboard"):
        toy2d.run("no_such_dataset", iters=1)
