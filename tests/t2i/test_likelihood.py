"""Likelihoods on one stated variable: the FM ODE density with the exact divergence, a flow's
exact density and the NTM bound, all on ``x_t0`` of the dequantised image."""

from __future__ import annotations

import math

import pytest
import torch
from toy_configs import tiny_digits_t2i

from trajflow import NormalizingFlow, Sequential
from trajflow.blocks.tarflow import TarFlowBlock
from trajflow.flow import standard_normal_log_prob
from trajflow_t2i.data import make_split
from trajflow_t2i.likelihood import (
    T0,
    flow_bits_per_dim,
    likelihood_variable,
    model_bits_per_dim,
    ntm_bits_per_dim,
    ode_log_density,
)
from trajflow_t2i.likelihood import (
    _velocity_and_divergence as velocity_and_divergence,
)
from trajflow_t2i.model import TextToImage, patchify


def _gaussian_mixture(dims=4, seed=0):
    """Data: a two-component Gaussian mixture, whose FM marginals and velocity are exact."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(2, dims, generator=g, dtype=torch.float64)
    variances = 0.05 + torch.rand(2, dims, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)

    def components(x, t):
        t = t[:, None, None]
        mean = (1 - t) * means
        var = (1 - t) ** 2 * variances + t**2
        log_n = -0.5 * (((x[:, None] - mean) ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)
        return mean, var, torch.log(weights) + log_n

    def velocity(x, t):
        mean, var, log_joint = components(x, t)
        t = t[:, None, None]
        # E[ε - x_0 | x_t, k] = -m_k + (x - (1-t) m_k) (t - (1-t) s_k²) / σ_k²
        v = -means + (x[:, None] - mean) * (t - (1 - t) * variances) / var
        return (log_joint.softmax(-1)[..., None] * v).sum(1)

    def log_density(x, t):
        return components(x, t)[2].logsumexp(-1)

    return velocity, log_density


def test_ode_likelihood_of_an_exact_field_matches_the_analytic_density():
    velocity, log_density = _gaussian_mixture()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = log_density(x, torch.full((6,), T0, dtype=torch.float64))
    got = ode_log_density(velocity, x, T0, steps=48)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    # A rotated Gaussian in 64 dimensions: a dense Jacobian whose trace alone counts.
    g = torch.Generator().manual_seed(2)
    q = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(-3, 0, 64, dtype=torch.float64)

    def rotated(x, t):
        t = t[:, None]
        rate = (t - (1 - t) * scales) / ((1 - t) ** 2 * scales + t**2)
        return ((x @ q) * rate) @ q.T

    x = torch.randn(3, 64, generator=g, dtype=torch.float64) * 0.1
    covariance = q @ torch.diag((1 - T0) ** 2 * scales + T0**2) @ q.T
    exact = torch.distributions.MultivariateNormal(torch.zeros(64, dtype=torch.float64), covariance)
    torch.testing.assert_close(
        ode_log_density(rotated, x, T0, steps=32), exact.log_prob(x), atol=1e-2, rtol=0
    )
    with pytest.raises(ValueError, match="t0 in"):
        ode_log_density(rotated, x, t0=0.0)
    with pytest.raises(ValueError, match="grid"):
        ode_log_density(rotated, x, grid="cosine")


def test_exact_divergence_of_a_conditional_network_matches_its_jacobian():
    torch.manual_seed(0)
    fm = TextToImage(tiny_digits_t2i(), stage="fm").eval()
    for parameter in fm.generator.net.parameters():  # leave the zero-initialised outputs
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    captions = ["a handwritten one", "the digit seven", "the number zero"]
    tokens, mask, _ = fm.encode_text(captions)
    x = torch.randn(3, 4, 16)
    t = torch.tensor([0.1, 0.5, 0.9])
    v, divergence = velocity_and_divergence(
        lambda s, u, y, m: fm.generator.velocity(s, u, y, m), x, t, (tokens, mask), chunk=40
    )
    for i in range(3):

        def one(s, i=i):
            return fm.generator.velocity(s[None], t[i : i + 1], tokens[i : i + 1], mask[i : i + 1])[
                0
            ]

        jacobian = torch.autograd.functional.jacobian(one, x[i]).reshape(64, 64)
        torch.testing.assert_close(divergence[i].float(), jacobian.trace(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v[i], one(x[i]), atol=1e-5, rtol=1e-5)


def test_tarflow_bits_per_dim_is_the_exact_density_on_the_stated_variable():
    torch.manual_seed(0)
    flow = NormalizingFlow(
        Sequential(
            TarFlowBlock(16, 4, dim=16, heads=2, layers=1),
            TarFlowBlock(16, 4, dim=16, heads=2, layers=1, flip=True),
        )
    ).double()
    with torch.no_grad():
        for block in flow.transform:
            block.head.weight.normal_(std=0.2)
    images = make_split("digits", "test", n=3).images
    to_event = lambda x: patchify(x, 4)  # noqa: E731
    result = flow_bits_per_dim(
        flow, images, 17, to_event=to_event, generator=torch.Generator().manual_seed(5)
    )
    # Directly: the same variable, the flow's map, its Jacobian's log-determinant by autograd.
    g = torch.Generator().manual_seed(5)  # draws u, then ε, as likelihood_variable does
    u = torch.rand(images.shape, generator=g)
    x = (1 - T0) * (2 * (images.double() + u) / 17 - 1) + T0 * torch.randn(
        images.shape, generator=g
    )
    for i in range(3):
        forward = lambda v: flow.transform(to_event(v.reshape(1, 1, 8, 8)))[0].reshape(64)  # noqa: E731
        flat = x[i].reshape(64)
        jacobian = torch.autograd.functional.jacobian(forward, flat)
        log_p = standard_normal_log_prob(forward(flat)[None])[0] + torch.linalg.slogdet(jacobian)[1]
        bits = (-log_p - 64 * math.log(2 / 17)) / (64 * math.log(2))
        assert result.bits_per_dim[i].item() == pytest.approx(bits.item(), abs=1e-5)
    assert result.variable.startswith("x_t0 = (1 - t0) x + t0 ε, t0 = 0.001, K = 17")
    with pytest.raises(ValueError, match=r"t0 in \(0, 1\)"):
        likelihood_variable(images, 17, t0=1.0)


def test_ntm_and_fm_bits_per_dim_are_on_the_same_variable():
    torch.manual_seed(0)
    fm = TextToImage(tiny_digits_t2i(), stage="fm").eval()
    ntm = TextToImage.finetune(fm).eval()
    data = make_split("digits", "test", n=4)
    bound = ntm_bits_per_dim(
        ntm, data.images, data.captions, generator=torch.Generator().manual_seed(3)
    )
    direct = ntm.bits_per_dim(
        data.images, data.captions, steps=4, t0=T0, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(bound.bits_per_dim, direct.bits_per_dim.double())
    ode = model_bits_per_dim(
        fm, data.images, data.captions, ode_steps=4, generator=torch.Generator().manual_seed(3)
    )
    assert bound.variable == ode.variable and "t0 = 0.001, K = 17" in ode.variable
    assert "RK4, 4 log-spaced steps" in ode.method and torch.isfinite(ode.bits_per_dim).all()
