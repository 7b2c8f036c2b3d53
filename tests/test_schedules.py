"""Time grids, the flow-matching Markov forward process and the posterior of one coarse step.

Every formula is checked against an independent derivation written out here (NTM_METHOD §2):
marginals and cross-covariances of whole trajectories by Monte Carlo, and the posterior
coefficients by conditioning the joint Gaussian of ``(x_s, x_t | x_0)`` with a Schur complement.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from trajflow.schedules import (
    SCHEDULES,
    ScheduleConfig,
    ShiftedGrid,
    UniformGrid,
    draw_steps,
    draw_t_min,
    forward_kernel,
    paper_shift,
    posterior_coefficients,
    posterior_mean_from_velocity,
    sample_trajectory,
    trajectory_covariance,
)

FEW = settings(max_examples=8, deadline=None)
F64 = torch.float64


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# --------------------------------------------------------------------------- time grids
@pytest.mark.parametrize("steps", [1, 2, 4, 7, 16])
def test_uniform_grid_values(steps):
    t_min = t64(1e-3, 0.01)
    times = SCHEDULES.build("uniform")(steps, t_min)
    expected = torch.tensor([k / steps for k in range(1, steps + 1)], dtype=F64)
    assert times.shape == (2, steps + 1)
    torch.testing.assert_close(times[:, 1:], expected.expand(2, -1), rtol=0, atol=1e-15)
    torch.testing.assert_close(times[:, 0], t_min, rtol=0, atol=0)


@FEW
@given(
    steps=st.integers(1, 32),
    shift=st.floats(-2.0, 3.0),
    fraction=st.floats(0.01, 0.99),
)
def test_shifted_grid_formula_monotone_and_ends_at_one(steps, shift, fraction):
    grid = SCHEDULES.build("shifted", shift=shift)
    levels = grid.levels(steps)
    # t_k = e^μ / (e^μ + 1/σ̃_k - 1) written out per level, in plain Python floats.
    expected = [math.exp(shift) / (math.exp(shift) + steps / k - 1) for k in range(1, steps + 1)]
    torch.testing.assert_close(levels, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14)
    t_min = t64(fraction * levels[0].item(), 0.5 * fraction * levels[0].item())
    times = grid(steps, t_min)
    assert times.shape == (2, steps + 1)
    assert torch.equal(times[:, 0], t_min)
    assert bool((times[:, 1:] > times[:, :-1]).all())
    # Ends at exactly 1 for every shift.
    torch.testing.assert_close(times[:, -1], torch.ones(2, dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps", [1, 4])
def test_shifted_grid_ends_exactly_at_one(steps):
    for shift in (-0.75, -0.6, 0.3, 1.7):
        assert ShiftedGrid(shift=shift).levels(steps)[-1].item() == 1.0, shift


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_shift_zero_is_uniform(steps):
    torch.testing.assert_close(
        ShiftedGrid(shift=0.0).levels(steps), UniformGrid().levels(steps), rtol=0, atol=1e-15
    )


def test_positive_shift_spends_more_levels_at_high_noise():
    uniform, shifted = UniformGrid().levels(4), ShiftedGrid(shift=1.0).levels(4)
    assert bool((shifted[:-1] > uniform[:-1]).all())
    assert bool((ShiftedGrid(shift=-1.0).levels(4)[:-1] < uniform[:-1]).all())


def test_paper_shift():
    assert paper_shift(256) == pytest.approx(0.5)
    assert paper_shift(4096) == pytest.approx(0.5 + 0.65)


def test_grid_keeps_float32_t_min_dtype():
    times = UniformGrid()(4, torch.tensor([0.01, 0.02], dtype=torch.float32))
    assert times.dtype == torch.float32
    assert times[:, -1].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("steps", "t_min", "match"),
    [
        (0, t64(0.01), "steps >= 1"),
        (-3, t64(0.01), "steps >= 1"),
        (4, t64(0.0), r"t_min must lie in \(0, t_1 = 0.25\)"),
        (4, t64(-0.1), "t_min must lie in"),
        (4, t64(0.01, 0.25), "t_min must lie in"),  # t_min == t_1: not strictly below
        (4, t64(0.5), "t_min must lie in"),
        (4, torch.full((2, 2), 0.01, dtype=F64), r"t_min of shape \(B,\)"),
    ],
)
def test_bad_grid_arguments_raise(steps, t_min, match):
    with pytest.raises(ValueError, match=match):
        UniformGrid()(steps, t_min)


def test_unknown_schedule_lists_known_names():
    with pytest.raises(KeyError, match="shifted, uniform"):
        SCHEDULES.get("cosine")


# --------------------------------------------------------------------------- per-batch draws
@FEW
@given(seed=st.integers(0, 2**16), low=st.floats(1e-4, 0.02), width=st.floats(0.0, 0.05))
def test_draw_t_min_in_range(seed, low, width):
    high = low + width
    t_min = draw_t_min(500, low, high, torch.Generator().manual_seed(seed))
    assert t_min.shape == (500,) and t_min.dtype == F64
    assert bool(((t_min >= low) & (t_min <= high)).all())
    if width > 1e-3:  # spread over the whole interval, not stuck at one end
        assert t_min.min() < low + 0.2 * width and t_min.max() > high - 0.2 * width


def test_draw_t_min_is_seeded_and_uniform():
    a = draw_t_min(20000, 1e-3, 0.05, torch.Generator().manual_seed(3))
    b = draw_t_min(20000, 1e-3, 0.05, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    mean, std = (1e-3 + 0.05) / 2, (0.05 - 1e-3) / math.sqrt(12)
    assert abs(a.mean().item() - mean) < 5 * std / math.sqrt(a.numel())


@pytest.mark.parametrize(("low", "high"), [(0.0, 0.05), (0.06, 0.05), (0.01, 1.0), (-1, 0.1)])
def test_draw_t_min_rejects_bad_ranges(low, high):
    with pytest.raises(ValueError, match="0 < low <= high < 1"):
        draw_t_min(4, low, high)


def test_draw_steps_from_the_set():
    generator = torch.Generator().manual_seed(0)
    choices = [4, 8, 16]
    drawn = [draw_steps(choices, generator) for _ in range(300)]
    assert set(drawn) == set(choices)
    assert all(isinstance(step, int) for step in drawn)
    assert draw_steps([5]) == 5
    with pytest.raises(ValueError, match="at least one step count"):
        draw_steps([])


# --------------------------------------------------------------------------- forward process
@FEW
@given(s=st.floats(0.0, 0.95), gap=st.floats(0.01, 1.0))
def test_forward_kernel_preserves_the_marginals(s, gap):
    t = min(s + gap * (1 - s), 1.0)
    if t <= s:
        return
    alpha, variance = forward_kernel(t64(s), t64(t))
    # Independently: α = (1-t)/(1-s) and σ² = t² - α² s² keep N((1-t) x_0, t²).
    expected_alpha = (1 - t) / (1 - s)
    assert alpha.item() == pytest.approx(expected_alpha, rel=1e-12, abs=1e-15)
    assert variance.item() == pytest.approx(t**2 - expected_alpha**2 * s**2, rel=1e-10, abs=1e-14)
    assert variance.item() > 0


def trajectory_times(n: int, levels: list[float]) -> torch.Tensor:
    return torch.tensor(levels, dtype=F64).expand(n, -1).contiguous()


def test_sample_trajectory_marginals_and_cross_covariances_by_monte_carlo():
    n, levels = 40000, [0.03, 0.2, 0.45, 0.8, 1.0]
    x0_value = torch.tensor([1.5, -0.7], dtype=F64)
    x0 = x0_value.expand(n, -1)
    times = trajectory_times(n, levels)
    trajectory = sample_trajectory(x0, times, torch.Generator().manual_seed(0))
    assert trajectory.shape == (n, len(levels), 2) and trajectory.dtype == F64
    t = torch.tensor(levels, dtype=F64)
    for dim in range(2):
        samples = trajectory[:, :, dim]  # (n, K)
        mean = samples.mean(0)
        expected_mean = (1 - t) * x0_value[dim]
        mean_error = (t / math.sqrt(n)).clamp_min(1e-12)
        assert bool(((mean - expected_mean).abs() <= 5 * mean_error).all()), (mean, expected_mean)
        centred = samples - expected_mean
        covariance = centred.T @ centred / n
        # Cross-covariances of the Markov chain, derived here: Cov(x_s, x_t) = α(s, t) s² for s < t.
        expected = torch.empty(len(levels), len(levels), dtype=F64)
        for i, a in enumerate(levels):
            for j, b in enumerate(levels):
                low, high = min(a, b), max(a, b)
                if low == 1.0:  # x_1 is pure noise: unit variance
                    expected[i, j] = 1.0
                else:  # α(low, high) · low²; zero with x_1, which forgets x_s
                    expected[i, j] = (1 - high) / (1 - low) * low**2
        # Standard error of a sample covariance: sqrt((σ_i² σ_j² + σ_ij²) / n).
        error = ((t[:, None] ** 2 * t[None, :] ** 2 + expected**2) / n).sqrt()
        assert bool(((covariance - expected).abs() <= 5 * error).all()), (covariance, expected)
    # The library's S_ij agrees with the chain on levels below 1.
    torch.testing.assert_close(
        trajectory_covariance(t[:-1]), expected[:-1, :-1], rtol=1e-12, atol=0
    )


def test_sample_trajectory_is_seeded_and_per_sample_times_are_used():
    x0 = torch.zeros(3, 4, dtype=F64)
    times = torch.stack([UniformGrid()(2, t64(1e-3))[0], t64(0.1, 0.2, 1.0), t64(0.4, 0.9, 1.0)])
    a = sample_trajectory(x0, times, torch.Generator().manual_seed(1))
    b = sample_trajectory(x0, times, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_trajectory(x0, times, torch.Generator().manual_seed(2)))
    # x0 = 0: the first level is t_0 ε with the sample's own t_0.
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(a[:, 0], times[:, :1] * noise)


def test_sample_trajectory_checks_times_shape():
    with pytest.raises(ValueError, match=r"times of shape \(B=3, T \+ 1\)"):
        sample_trajectory(torch.zeros(3, 2), torch.rand(2, 4))
    with pytest.raises(ValueError, match="times of shape"):
        sample_trajectory(torch.zeros(3, 2), torch.rand(3))


def test_trajectory_covariance_batched_shape():
    times = torch.rand(5, 3, dtype=F64) * 0.9
    covariance = trajectory_covariance(times)
    assert covariance.shape == (5, 3, 3)
    torch.testing.assert_close(covariance, covariance.transpose(-1, -2))
    torch.testing.assert_close(covariance.diagonal(dim1=-2, dim2=-1), times**2)


# --------------------------------------------------------------------------- posterior
def schur_posterior(s: float, t: float) -> tuple[float, float, float]:
    """``q(x_s | x_t, x_0)`` by conditioning the joint Gaussian of ``(x_s, x_t)`` given ``x_0``.

    Means ``(1-s) x_0, (1-t) x_0``; covariance from the marginals and the chain's
    ``Cov(x_s, x_t) = α s²``. Returns ``(A, B, C²)`` of ``N(A x_t + B x_0, C²)``.
    """
    cross = (1 - t) / (1 - s) * s**2
    joint = torch.tensor([[s**2, cross], [cross, t**2]], dtype=F64)
    gain = joint[0, 1] / joint[1, 1]  # Σ_12 Σ_22^{-1}
    schur = joint[0, 0] - gain * joint[1, 0]  # Σ_11 - Σ_12 Σ_22^{-1} Σ_21
    # mean = (1-s) x_0 + gain (x_t - (1-t) x_0)
    return gain.item(), (1 - s) - gain.item() * (1 - t), schur.item()


@FEW
@given(s=st.floats(1e-4, 0.98), gap=st.floats(0.005, 1.0))
def test_posterior_coefficients_match_gaussian_conditioning(s, gap):
    t = min(s + gap * (1 - s), 1.0)
    if t - s < 1e-4:
        return
    a, b, c2 = posterior_coefficients(t64(s), t64(t))
    ref_a, ref_b, ref_c2 = schur_posterior(s, t)
    assert a.item() == pytest.approx(ref_a, rel=1e-9, abs=1e-13)
    assert b.item() == pytest.approx(ref_b, rel=1e-9, abs=1e-13)
    assert c2.item() == pytest.approx(ref_c2, rel=1e-7, abs=1e-13)


def test_posterior_coefficients_broadcast_over_batches():
    s, t = t64(0.1, 0.3, 0.5), t64(0.2, 0.9, 1.0)
    a, b, c2 = posterior_coefficients(s, t)
    for i in range(3):
        ref = schur_posterior(s[i].item(), t[i].item())
        torch.testing.assert_close(torch.stack([a[i], b[i], c2[i]]), t64(*ref))


@FEW
@given(seed=st.integers(0, 2**16), s=st.floats(0.01, 0.9), gap=st.floats(0.02, 1.0))
def test_posterior_mean_from_velocity_is_a_x_plus_b_x0hat(seed, s, gap):
    t = min(s + gap * (1 - s), 1.0)
    if t - s < 1e-3:
        return
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(4, 3, generator=generator, dtype=F64)
    velocity = torch.randn(4, 3, generator=generator, dtype=F64)
    ref_a, ref_b, _ = schur_posterior(s, t)
    x0_hat = x_t - t * velocity
    mean = posterior_mean_from_velocity(x_t, velocity, torch.full((4,), s, dtype=F64), t64(t))
    torch.testing.assert_close(mean, ref_a * x_t + ref_b * x0_hat, rtol=1e-10, atol=1e-10)


def test_posterior_limits():
    x_t = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    velocity = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    for t in (0.3, 0.7, 1.0):
        if t < 1:  # s → t: the step vanishes (not at t = 1, where x_1 forgets x_s: A = 0).
            s_near = t64(t - 1e-9, t - 1e-9)
            mean = posterior_mean_from_velocity(x_t, velocity, s_near, t64(t, t))
            torch.testing.assert_close(mean, x_t, rtol=0, atol=1e-7)
            assert posterior_coefficients(s_near, t64(t, t)).c2.max().item() < 1e-8
        # s → 0: the mean is the clean-point estimate x̂_0 = x_t - t v, the noise vanishes.
        for s in (0.0, 1e-9):
            mean = posterior_mean_from_velocity(x_t, velocity, t64(s, s), t64(t, t))
            torch.testing.assert_close(mean, x_t - t * velocity, rtol=0, atol=1e-7)
            a, b, c2 = posterior_coefficients(t64(s), t64(t))
            assert abs(a.item()) < 1e-8 and b.item() == pytest.approx(1.0, abs=1e-8)
            assert c2.item() < 1e-16


@pytest.mark.parametrize("s", [1e-3, 0.1, 0.5, 0.9])
def test_posterior_at_t_equal_one(s):
    a, b, c2 = posterior_coefficients(t64(s), t64(1.0))
    assert a.item() == 0.0
    assert b.item() == pytest.approx(1 - s, rel=1e-12)
    assert c2.sqrt().item() == pytest.approx(s, rel=1e-12)


# --------------------------------------------------------------------------- config
def test_schedule_config_builds_the_named_grid():
    config = ScheduleConfig(grid="shifted", shift=0.7, steps=[2, 4])
    grid = config.build()
    assert isinstance(grid, ShiftedGrid) and grid.shift == 0.7
    torch.testing.assert_close(grid.levels(4), ShiftedGrid(0.7).levels(4))
    assert isinstance(ScheduleConfig().build(), UniformGrid)
    assert ScheduleConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": [0, 4]}, "steps"),
        ({"steps": []}, "steps"),
        ({"t_min_low": 0.0}, "t_min_low"),
        ({"t_min_high": 1.0}, "t_min_high"),
        ({"t_min_eval": -0.1}, "t_min_eval"),
        ({"shift": "big"}, "shift"),
        ({"stpes": [4]}, "stpes"),
    ],
)
def test_schedule_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        ScheduleConfig(**kwargs)


def test_schedule_config_unknown_grid_names_the_field():
    with pytest.raises(ValidationError, match="grid"):
        ScheduleConfig(grid="cosine")


def test_schedule_config_rejects_inverted_t_min_range():
    with pytest.raises(ValidationError, match="t_min"):
        ScheduleConfig(t_min_low=0.04, t_min_high=0.01)


def test_schedule_config_rejects_t_min_above_first_level():
    with pytest.raises(ValidationError, match="t_min"):
        ScheduleConfig(steps=[4, 64])
