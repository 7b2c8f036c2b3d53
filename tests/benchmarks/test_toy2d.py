"""The toy benchmark's importable run() works on registered and user-registered datasets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trajflow import DATASETS

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


def test_run_reports_every_method_and_target(toy2d, ring_dataset):
    result = toy2d.run(ring_dataset, seed=0, iters=3, eval_points=300)
    methods = {(r["method"], r["steps"]) for r in result["records"]}
    assert {("ntm", t) for t in (1, 2, 4, 8)} <= methods
    assert {("gaussian_chain", t) for t in (1, 2, 4, 8)} <= methods
    assert {("flow_matching", t) for t in (1, 2, 4, 8, 16, 32, 100)} <= methods
    assert ("nsf", None) in methods
    for record in result["records"]:
        assert record["sliced_wasserstein"] >= 0 and record["train_step_ms"] > 0
    bounds = [r["bits_per_dim"] for r in result["records"] if r["bits_per_dim"] is not None]
    assert len(bounds) == 3  # NTM and chain at T=4 (bound), NSF (exact)
    assert len(result["targets"]) == 4
    assert "t0 = 0.001" in result["settings"]["bits_per_dim_variable"]
    assert set(result["panels"]) >= {"data", "ntm T=4", "FM Euler 100", "zuko NSF"}


def test_unknown_dataset_lists_the_known_ones(toy2d):
    with pytest.raises(KeyError, match="checkerboard"):
        toy2d.run("no_such_dataset", iters=1)
