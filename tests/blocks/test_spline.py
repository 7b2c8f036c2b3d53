"""Rational-quadratic splines: oracles (zuko, nflows), extreme inputs, compilation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trajflow import Context
from trajflow.blocks.spline import SplineCoupling, rational_quadratic_spline, spline_knots
from trajflow.testing import perturb_parameters

zuko = pytest.importorskip("zuko")
nflows_splines = pytest.importorskip("nflows.transforms.splines.rational_quadratic")


def raw_parameters(seed: int, shape: tuple[int, ...], bins: int, scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *s: scale * torch.randn(*shape, *s, generator=generator, dtype=torch.float64)  # noqa: E731
    return draw(bins), draw(bins), draw(bins - 1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bins=st.integers(2, 12), bound=st.floats(0.5, 8.0))
def test_matches_zuko_with_the_same_knots(seed, bins, bound):
    widths, heights, derivatives = raw_parameters(seed, (64,), bins)
    transform = zuko.transforms.MonotonicRQSTransform(widths, heights, derivatives, bound=bound)
    x = (
        1.5
        * bound
        * torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )

    y, logdet = rational_quadratic_spline(
        x, transform.horizontal, transform.vertical, transform.derivatives
    )
    torch.testing.assert_close(y, transform(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet, transform.log_abs_det_jacobian(x, y), atol=1e-10, rtol=0)
    x_again, _ = rational_quadratic_spline(
        y, transform.horizontal, transform.vertical, transform.derivatives, inverse=True
    )
    torch.testing.assert_close(x_again, transform.inv(y), atol=1e-10, rtol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bins=st.integers(2, 12), bound=st.floats(0.5, 8.0))
def test_matches_nflows_from_the_same_raw_parameters(seed, bins, bound):
    widths, heights, derivatives = raw_parameters(seed, (64,), bins)
    x = (
        1.5
        * bound
        * torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    knots = spline_knots(widths, heights, derivatives, bound=bound)
    for inverse in (False, True):
        ours, ours_logdet = rational_quadratic_spline(x, *knots, inverse=inverse)
        theirs, theirs_logdet = nflows_splines.unconstrained_rational_quadratic_spline(
            x, widths, heights, derivatives, inverse=inverse, tails="linear", tail_bound=bound
        )
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
        torch.testing.assert_close(ours_logdet, theirs_logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("raw_scale", [1.0, 1e4])  # 1e4: every knot at its clamp limit
def test_values_and_gradients_stay_finite_for_extreme_inputs(inverse, raw_scale):
    widths, heights, derivatives = raw_parameters(0, (7,), 8, scale=raw_scale)
    widths, heights, derivatives = (p.requires_grad_() for p in (widths, heights, derivatives))
    x = torch.tensor([-1e6, -5.0, -1e-12, 0.0, 1e-12, 4.999999, 1e6], dtype=torch.float64)
    x.requires_grad_()
    y, logdet = rational_quadratic_spline(
        x, *spline_knots(widths, heights, derivatives, bound=5.0), inverse=inverse
    )
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    (y.sum() + logdet.sum()).backward()
    for tensor in (x, widths, heights, derivatives):
        assert torch.isfinite(tensor.grad).all()
    # Linear tails: far outside the bound the map is exactly the identity.
    assert y[0].item() == -1e6 and y[-1].item() == 1e6


def test_float32_stays_finite_at_clamp_limits():
    widths, heights, derivatives = (p.float() for p in raw_parameters(1, (1000,), 8, scale=1e4))
    x = torch.linspace(-6, 6, 1000)
    for inverse in (False, True):
        y, logdet = rational_quadratic_spline(
            x, *spline_knots(widths, heights, derivatives, bound=5.0), inverse=inverse
        )
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


def test_new_spline_coupling_is_the_identity():
    block = SplineCoupling(features=6, bins=8, bound=3.0, hidden_features=(16,))
    x = 4 * torch.randn(32, 6)
    y, logdet = block(x)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros(32), atol=1e-5, rtol=0)


def test_spline_coupling_on_token_sequences_with_context():
    block = SplineCoupling(features=4, bins=5, context_features=2, hidden_features=(8,))
    block = perturb_parameters(block.double(), scale=0.5)
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    ctx = Context(cond=torch.randn(3, 2, dtype=torch.float64))
    y, logdet = block(x, ctx)
    x_again, inverse_logdet = block.inverse(y, ctx)
    torch.testing.assert_close(x_again, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-10, rtol=0)
    # Tokens are transformed independently: the log-det sums per-token contributions.
    per_token = torch.stack([block(x[:, i : i + 1], ctx)[1] for i in range(7)], dim=1).sum(1)
    torch.testing.assert_close(per_token, logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("bins, message", [(1, "bins >= 2"), (8, "bound > 0")])
def test_bad_spline_arguments(bins, message):
    with pytest.raises(ValueError, match=message):
        SplineCoupling(features=4, bins=bins, bound=0.0 if bins == 8 else 1.0)


def test_bad_knot_shapes_name_the_expected_shapes():
    with pytest.raises(ValueError, match=r"\(\.\.\., K - 1\)"):
        spline_knots(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3, 8))
