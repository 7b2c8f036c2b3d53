"""The steps diagnosis of the toy benchmark: its pieces are exact and its report complete."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from trajflow.config import toy_ntm_config
from trajflow.schedules import sample_trajectory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def steps_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "toy2d_steps", ROOT / "benchmarks" / "toy2d_steps.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model():
    torch.manual_seed(0)
    model = toy_ntm_config(predictor_hidden=[16], transporter_layers=2).build()
    for parameter in model.parameters():  # away from the identity init, so every term counts
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("steps", [2, 4])
def test_level_nll_sums_to_the_trajectory_likelihood(steps_script, steps):
    # float64: the clean-most factor is huge (C ~ t_0) and the log-dets must still count.
    model, x0 = _model().double(), torch.randn(64, 2, dtype=torch.float64)
    per_level = steps_script.level_nll(model, x0, steps, torch.Generator().manual_seed(3))
    times = steps_script.grid(model, 64, steps)
    trajectory = sample_trajectory(x0, times, torch.Generator().manual_seed(3))
    top = -(-0.5 * trajectory[:, -1].square() - 0.5 * math.log(2 * math.pi)).sum(-1).mean() / 2
    with torch.no_grad():
        expected = -model.trajectory_log_prob(trajectory, times).mean() / 2
    assert len(per_level) == steps
    assert sum(per_level) + float(top) == pytest.approx(float(expected), rel=1e-9, abs=1e-6)


def test_starting_at_the_top_is_the_ordinary_sampler(steps_script):
    """From level T the chain starts at x_1 ~ N(0, I), like NTM.sample: same law (many points)."""
    model, x0 = _model(), torch.randn(20_000, 2)
    started = steps_script.start_from_level(model, x0, 4, 4, torch.Generator().manual_seed(1))
    sampled = model.sample(20_000, steps=4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(started.mean(0), sampled.mean(0), atol=0.05)
    assert torch.allclose(started.std(0), sampled.std(0), rtol=0.05)


def test_starting_from_a_true_level_uses_the_data(steps_script):
    """From level 1 the samples depend on the data's trajectory; from the top (x_1 is pure
    noise, independent of x_0) they do not."""
    model, x0 = _model(), torch.randn(500, 2)

    def start(cloud, level):
        return steps_script.start_from_level(
            model, cloud, 4, level, torch.Generator().manual_seed(1)
        )

    assert torch.allclose(start(x0, 4), start(x0 + 3.0, 4), atol=1e-5)
    assert (start(x0, 1) - start(x0 + 3.0, 1)).abs().mean() > 0.02


@pytest.mark.parametrize("steps", [2, 4])
def test_one_step_from_the_truth(steps_script, steps):
    """From level 1 it is the last step of start_from_level, draw for draw; from any level
    the reference is the true next-cleaner level of the same trajectories."""
    model, x0 = _model(), torch.randn(300, 2)
    stepped, truth = steps_script.single_step(model, x0, steps, 1, torch.Generator().manual_seed(4))
    started = steps_script.start_from_level(model, x0, steps, 1, torch.Generator().manual_seed(4))
    torch.testing.assert_close(stepped, started)
    for level in range(1, steps + 1):
        generator = torch.Generator().manual_seed(4)
        _, truth = steps_script.single_step(model, x0, steps, level, generator)
        times = steps_script.grid(model, 300, steps)
        trajectory = sample_trajectory(x0, times, torch.Generator().manual_seed(4))
        torch.testing.assert_close(truth, trajectory[:, level - 1])


def test_oracle_posterior_of_gaussian_data_is_the_closed_form(steps_script):
    """x_0 ~ N(0, s²): E[x_0 | x_t] = (1-t) s² x_t / r and Var = s² t² / r, r = (1-t)² s² + t²."""
    scale, t = 0.7, 0.4
    reference = scale * torch.randn(40_000, 1, generator=torch.Generator().manual_seed(0))
    x_t = torch.linspace(-1.5, 1.5, 7)[:, None]
    mean, variance = steps_script.oracle_posterior(x_t, t, reference)
    ratio = (1 - t) ** 2 * scale**2 + t**2
    torch.testing.assert_close(mean, (1 - t) * scale**2 * x_t / ratio, rtol=0, atol=0.02)
    expected = torch.full_like(x_t, scale**2 * t**2 / ratio)
    torch.testing.assert_close(variance, expected, rtol=0.05, atol=0)


def test_the_best_gaussian_chain_of_gaussian_data_is_exact(steps_script):
    """For Gaussian data every true reverse step is Gaussian, so even T = 2 ends at N(0, s²)
    (up to t_0): the variance term B² v carries the spread a plain Gaussian step lacks."""
    scale = 0.7
    reference = scale * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0))
    times = steps_script.grid(_model(), 4000, 2)
    samples = steps_script.oracle_chain(times, reference, torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples.std(0), torch.full((2,), scale), rtol=0.05, atol=0)
    torch.testing.assert_close(samples.mean(0), torch.zeros(2), rtol=0, atol=0.04)


def test_the_best_gaussian_chain_of_one_point_lands_on_it(steps_script):
    point = torch.tensor([[0.8, -1.3]])
    times = steps_script.grid(_model(), 500, 4)
    samples = steps_script.oracle_chain(times, point, torch.Generator().manual_seed(0))
    # x_t0 = (1 - t0) x_0 + t0 ε with t0 = 1e-3: within a few t0 of the point.
    assert (samples - (1 - 1e-3) * point).abs().max() < 5e-3


def test_run_reports_every_piece(steps_script, monkeypatch):
    toy2d = sys.modules["toy2d"]
    monkeypatch.setattr(toy2d, "BATCH", 64)
    panels = {}
    result = steps_script.run("two_moons", iters=2, eval_points=200, panels=panels)
    starts = {(r["method"], r["steps"], r["start_level"]) for r in result["by_start_level"]}
    assert len(starts) == 2 * (4 + 8)
    assert {(r["method"], r["steps"], r["level"]) for r in result["single_step"]} == starts
    assert "one step j → j-1" in steps_script.tables(result)
    methods = ("ntm", "gaussian_chain", "best_gaussian_chain")
    assert {(r["method"], r["steps"]) for r in result["metrics"]} == {
        (m, t) for m in methods for t in (2, 4, 8)
    }
    assert all(len(r["nll_per_dim"]) == r["steps"] for r in result["level_nll"])
    assert "KDE precision" in steps_script.tables(result)
    assert set(panels) == {"data"} | {
        f"{m} T={t}" for m in ("ntm", "gaussian_chain", "best Gaussian chain") for t in (2, 4, 8)
    }
