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


def test_run_reports_every_piece(steps_script, monkeypatch):
    toy2d = sys.modules["toy2d"]
    monkeypatch.setattr(toy2d, "BATCH", 64)
    panels = {}
    result = steps_script.run("two_moons", iters=2, eval_points=200, panels=panels)
    starts = {(r["method"], r["steps"], r["start_level"]) for r in result["by_start_level"]}
    assert len(starts) == 2 * (4 + 8)
    assert {(r["method"], r["steps"]) for r in result["metrics"]} == {
        (m, t) for m in ("ntm", "gaussian_chain") for t in (2, 4, 8)
    }
    assert all(len(r["nll_per_dim"]) == r["steps"] for r in result["level_nll"])
    assert "KDE precision" in steps_script.tables(result)
    assert set(panels) == {"data"} | {
        f"{m} T={t}" for m in ("ntm", "gaussian_chain") for t in (2, 4, 8)
    }
