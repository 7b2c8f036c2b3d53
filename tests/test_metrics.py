"""Sample metrics: sliced Wasserstein, energy distance, bits/dim."""

from __future__ import annotations

import math

import pytest
import torch

from trajflow.metrics import bits_per_dim, energy_distance, kde_cross_entropy, sliced_wasserstein


def _gaussian(n: int, dims: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dims, generator=torch.Generator().manual_seed(seed)) + shift


def _w1_by_cdfs(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact 1-D W1 as ``∫|F - G| dt`` over the merged sample (a formula independent of ours)."""
    x, y = x.double().flatten(), y.double().flatten()
    points = torch.cat([x, y]).sort()[0]
    cdf_x = torch.searchsorted(x.sort()[0], points, right=True).double() / len(x)
    cdf_y = torch.searchsorted(y.sort()[0], points, right=True).double() / len(y)
    return float(((cdf_x - cdf_y)[:-1].abs() * points.diff()).sum())


def _sw(x, y, **kwargs) -> float:
    if x.shape[-1] == 1:  # every 1-D direction is ±1: a few suffice
        kwargs.setdefault("projections", 4)
    return sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(0), **kwargs)


def test_same_distribution_is_near_zero():
    x, y = _gaussian(6000, 2, seed=1), _gaussian(5000, 2, seed=2)
    assert _sw(x, y) < 0.05
    assert abs(energy_distance(x, y, generator=torch.Generator().manual_seed(0))) < 0.01


def test_distances_grow_with_a_mean_shift():
    x = _gaussian(1500, 2, seed=1)
    shifts = [0.25, 0.5, 1.0, 2.0]
    sw = [_sw(x, _gaussian(1500, 2, seed=2, shift=s), projections=64) for s in shifts]
    energy = [energy_distance(x, _gaussian(1500, 2, seed=2, shift=s)) for s in shifts]
    assert sw == sorted(sw) and energy == sorted(energy)
    assert sw[0] > 0.05 and energy[0] > 0.01


@pytest.mark.parametrize("shift", [-1.5, 0.3, 2.0])
def test_sliced_wasserstein_is_the_exact_w1_in_one_dimension(shift):
    x = _gaussian(2000, 1, seed=3).double()
    # A translated copy: W1 is exactly |shift|.
    assert _sw(x, x + shift) == pytest.approx(abs(shift), abs=1e-12)
    y = _gaussian(1500, 1, seed=4, shift=shift)
    assert _sw(x, y) == pytest.approx(_w1_by_cdfs(x, y), abs=1e-9)
    assert _sw(x, y) == pytest.approx(abs(shift), abs=0.1)  # population value


def test_unequal_sizes_match_the_cdf_formula_on_small_samples():
    x, y = torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([[2.0], [-1.0]])
    assert _sw(x, y) == pytest.approx(_w1_by_cdfs(x, y), abs=1e-12)


def test_metrics_are_symmetric():
    x, y = _gaussian(700, 3, seed=5), _gaussian(400, 3, seed=6, shift=0.5)
    assert _sw(x, y) == pytest.approx(_sw(y, x), rel=1e-12)
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-12)


def test_energy_distance_matches_the_pairwise_formula():
    x, y = _gaussian(40, 2, seed=7), _gaussian(30, 2, seed=8, shift=0.7)
    xy = torch.cdist(x.double(), y.double()).mean()
    xx = torch.cdist(x.double(), x.double()).sum() / (40 * 39)
    yy = torch.cdist(y.double(), y.double()).sum() / (30 * 29)
    expected = float(2 * xy - xx - yy)
    assert energy_distance(x, y, max_points=None) == pytest.approx(expected, rel=1e-10)
    assert energy_distance(x, y, max_points=None, chunk_size=7) == pytest.approx(
        expected, rel=1e-10
    )


def test_large_clouds_are_subsampled_and_chunked():
    x, y = _gaussian(20_000, 2, seed=9), _gaussian(20_000, 2, seed=10, shift=1.0)
    value = energy_distance(x, y, max_points=2048, generator=torch.Generator().manual_seed(0))
    assert 0.3 < value < 1.5  # population value for a unit shift in 2-D is about 0.6
    assert _sw(x, y, projections=32) > 0.4


@pytest.mark.parametrize(
    ("x", "y", "error"),
    [
        (torch.zeros(10), torch.zeros(10, 1), ValueError),  # not (N, D)
        (torch.zeros(4, 2, 1), torch.zeros(4, 2), ValueError),
        (torch.zeros(5, 2), torch.zeros(5, 3), ValueError),  # feature mismatch
        (torch.zeros(0, 2), torch.zeros(5, 2), ValueError),  # empty
        (torch.full((3, 2), math.nan), torch.zeros(3, 2), ValueError),
        ([[0.0, 1.0]], torch.zeros(3, 2), TypeError),  # not a tensor
        (torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2), TypeError),
    ],
)
def test_bad_inputs_raise(x, y, error):
    with pytest.raises(error, match=r"expected|must"):
        sliced_wasserstein(x, y)
    with pytest.raises(error, match=r"expected|must"):
        energy_distance(x, y)


def test_bad_options_raise():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="projections"):
        sliced_wasserstein(x, x, projections=0)
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance(x[:1], x)
    with pytest.raises(ValueError, match="max_points"):
        energy_distance(x, x, max_points=1)


def test_bits_per_dim():
    assert bits_per_dim(3 * math.log(2), dims=3) == pytest.approx(1.0)
    values = bits_per_dim(torch.tensor([0.0, 2 * math.log(2)]), dims=2)
    torch.testing.assert_close(values, torch.tensor([0.0, 1.0]))
    for dims in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="dims"):
            bits_per_dim(1.0, dims=dims)
    with pytest.raises(TypeError, match="nll_nats"):
        bits_per_dim("1.0", dims=2)


@pytest.mark.parametrize("bandwidth", [0.3, 1.0])
def test_kde_cross_entropy_matches_the_smoothed_gaussian(bandwidth):
    """For y ~ N(0, I) the KDE tends to N(0, (1 + h²) I); the cross-entropy of N(0, I) under it
    is ``D/2 · (log 2π(1 + h²) + 1/(1 + h²))``."""
    x, y = _gaussian(4000, 2, seed=1), _gaussian(8000, 2, seed=2)
    variance = 1 + bandwidth**2
    expected = math.log(2 * math.pi * variance) + 1 / variance  # D = 2
    assert kde_cross_entropy(x, y, bandwidth=bandwidth) == pytest.approx(expected, abs=0.03)


def test_kde_cross_entropy_sees_local_structure_that_moments_miss():
    """Points on a ring vs a disk with the same mean and covariance: the energy distance is
    small, but the disk's points mostly lie where the ring has no mass."""
    g = torch.Generator().manual_seed(0)
    angle = 2 * math.pi * torch.rand(4000, generator=g)
    ring = torch.stack([angle.cos(), angle.sin()], dim=1) * math.sqrt(2)
    disk = torch.randn(4000, 2, generator=g)  # covariance I, like the ring's
    ring_again = torch.stack([angle.sin(), angle.cos()], dim=1) * math.sqrt(2)
    assert kde_cross_entropy(disk, ring) > kde_cross_entropy(ring_again, ring) + 1.0


def test_kde_cross_entropy_bad_options_raise():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_cross_entropy(x, x, bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_cross_entropy(x, x, bandwidth=float("nan"))
    with pytest.raises(ValueError, match="chunk_size"):
        kde_cross_entropy(x, x, chunk_size=0)
    with pytest.raises(ValueError, match="finite"):
        kde_cross_entropy(torch.full((2, 2), float("inf")), x)
