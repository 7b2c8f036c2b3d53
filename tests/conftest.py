"""Shared options and fixtures: ``--dtype`` and ``--device`` select what the block tests run in."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--dtype",
        default="float64",
        choices=["float32", "float64"],
        help="dtype of the property tests (float64 for tight log-det checks)",
    )
    parser.addoption("--device", default="cpu", help="torch device of the property tests")


@pytest.fixture
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return device


@pytest.fixture
def tolerance(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 2e-4


# CI runs hypothesis derandomised (a fixed sequence of examples) so that a run is reproducible;
# locally every run explores new examples.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")
