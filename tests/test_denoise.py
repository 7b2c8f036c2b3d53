"""Trajectory score denoising and the learned denoiser (NTM_METHOD §7).

The reference for the score path is independent of the NTM: for Gaussian data the joint of
``(x_0, x_{t_0}, …, x_{t_T})`` is Gaussian, built here by running the forward Markov chain's
covariance recursion, and ``E[x_0 | trajectory]`` is Gaussian conditioning on it. An *oracle*
predictor realises the exact reverse steps of that process in u-space, so trajectory Tweedie
on the NTM must reproduce the conditional mean to float64 precision. With a nonlinear
transporter, the reference is the Tweedie formula written out with finite differences of the
trajectory NLL in x-space.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from trajflow import BLOCKS, NTM, PREDICTORS, Context, Sequential
from trajflow.checkpoint import save_checkpoint
from trajflow.core import Block
from trajflow.denoise import (
    DENOISERS,
    LearnedDenoiser,
    denoiser_loss,
    denoiser_targets,
    invert_trajectory,
    load_denoiser,
    sample_denoised,
    sample_u_trajectory,
    sample_with_denoiser,
    save_denoiser,
    trajectory_score_denoise,
    trajectory_tweedie,
)
from trajflow.predictors import Predictor
from trajflow.schedules import UniformGrid, sample_trajectory, trajectory_covariance
from trajflow.testing import perturb_parameters

F64 = torch.float64
D = 3
MEAN = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
STD = torch.tensor([0.7, 1.3, 0.4], dtype=F64)


# --------------------------------------------------------------------------- the Gaussian case
def affine_coefficients(t: Tensor, rate: Tensor, amplitude: Tensor) -> tuple[Tensor, Tensor]:
    """``log a(t) = rate · t`` and ``b(t) = amplitude · sin(3t)``, per dimension ``(..., D)``."""
    return t[..., None] * rate, amplitude * torch.sin(3 * t[..., None])


class AffineInTime(Block):
    """``u = a(t) x + b(t)``: a time-dependent affine transporter, so a Gaussian stays Gaussian."""

    conditional = True

    def __init__(self, rate: Tensor, amplitude: Tensor):
        super().__init__()
        self.register_buffer("rate", rate)
        self.register_buffer("amplitude", amplitude)
        self.time_features = 1  # the convention Block.uses_time reads: this block reads ctx.t

    def forward(self, x, ctx=None):
        log_a, b = affine_coefficients(ctx.t, self.rate, self.amplitude)
        return x * log_a.exp() + b, log_a.sum(-1)

    def inverse(self, u, ctx=None):
        log_a, b = affine_coefficients(ctx.t, self.rate, self.amplitude)
        return (u - b) * (-log_a).exp(), -log_a.sum(-1)

    @classmethod
    def example(cls, generator=None):
        block = cls(torch.tensor([0.4, -0.6, 0.9]), torch.tensor([0.3, 0.2, -0.5]))
        return block, torch.randn(4, D, generator=generator), Context(t=torch.rand(4))


def written_out_coefficients(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q(x_s | x_t, x_0) = N(A x_t + B x_0, C²)`` (NTM_METHOD §2), written out here."""
    gap = (t - s) * (t + s - 2 * t * s)
    return (
        s**2 * (1 - t) / (t**2 * (1 - s)),
        gap / (t**2 * (1 - s)),
        s**2 * gap / (t * (1 - s)) ** 2,
    )


class GaussianOracle(Predictor):
    """The exact reverse step ``q(x_s | x_t)`` for data ``N(MEAN, diag(STD²))``, in the u-space
    of an optional :class:`AffineInTime` transporter.

    ``q(x_s | x_t) = N(A x_t + B E[x_0|x_t], C² + B² Var[x_0|x_t])``; mapped through ``u = a x + b``
    and expressed as the NTM's ``(x̂_0, δ)`` so that ``μ = A u_t + B x̂_0``, ``σ = C e^δ``.
    """

    def __init__(self, affine: AffineInTime | None = None):
        super().__init__("x0", 0, 2)
        # A parameter (frozen) so the NTM finds the dtype; the oracle has nothing to learn.
        self.mean = nn.Parameter(MEAN.clone(), requires_grad=False)
        self.std = STD.clone()
        self.affine = (affine.rate, affine.amplitude) if affine is not None else None

    @property
    def event_shape(self):
        return (D,)

    def _affine(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.affine is None:
            return torch.zeros(*t.shape, D, dtype=F64), torch.zeros(*t.shape, D, dtype=F64)
        log_a, b = affine_coefficients(t, *self.affine)
        top = (t == 1)[..., None]  # u_T = x_1: the top level is never transported
        return torch.where(top, 0.0, log_a), torch.where(top, 0.0, b)

    def forward(self, u, t_in, t_out=None, steps=None, y=None, y_mask=None, drop=None):
        log_a_in, b_in = self._affine(t_in)
        x_in = (u - b_in) * (-log_a_in).exp()
        t, s = t_in[..., None], t_out[..., None]
        var_t = (1 - t) ** 2 * self.std**2 + t**2
        clean = self.mean + (1 - t) * self.std**2 / var_t * (x_in - (1 - t) * self.mean)
        clean_var = self.std**2 * t**2 / var_t
        a, b, c2 = written_out_coefficients(s, t)
        log_a_out, b_out = self._affine(t_out)
        mean_u = log_a_out.exp() * (a * x_in + b * clean) + b_out
        log_std_u = log_a_out + 0.5 * torch.log(c2 + b**2 * clean_var)
        return (mean_u - a * u) / b, log_std_u - 0.5 * torch.log(c2)


def forward_joint(times: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D, K+1)`` and covariance ``(D, K+1, K+1)`` of ``(x_0, x_{t_0}, …)`` per dimension,
    from the forward chain ``x_t = α x_s + N(0, σ²)`` (``x_0`` itself at ``t = 0``)."""
    levels = [0.0, *times.tolist()]
    size = len(levels)
    mean = torch.zeros(D, size, dtype=F64)
    cov = torch.zeros(D, size, size, dtype=F64)
    mean[:, 0], cov[:, 0, 0] = MEAN, STD**2
    for k in range(1, size):
        s, t = levels[k - 1], levels[k]
        alpha = (1 - t) / (1 - s)
        variance = t**2 - alpha**2 * s**2
        mean[:, k] = alpha * mean[:, k - 1]
        cov[:, k, :k] = alpha * cov[:, k - 1, :k]
        cov[:, :k, k] = cov[:, k, :k]
        cov[:, k, k] = alpha**2 * cov[:, k - 1, k - 1] + variance
    return mean, cov


def posterior_mean(trajectory: Tensor, times: Tensor) -> Tensor:
    """``E[x_0 | x_{t_0:t_T}]`` by Gaussian conditioning, per sample ``(B, D)``."""
    rows = []
    for x, row in zip(trajectory, times, strict=True):
        mean, cov = forward_joint(row)
        gain = torch.linalg.solve(cov[:, 1:, 1:], cov[:, 1:, 0:1])[..., 0]  # (D, T + 1)
        rows.append(MEAN + (gain * (x.T - mean[:, 1:])).sum(-1))
    return torch.stack(rows)


def gaussian_log_joint(trajectory: Tensor, times: Tensor) -> Tensor:
    """``log q(x_{t_0:t_T})`` of the forward process, per sample."""
    values = []
    for x, row in zip(trajectory, times, strict=True):
        mean, cov = forward_joint(row)
        normal = torch.distributions.MultivariateNormal(mean[:, 1:], cov[:, 1:, 1:])
        values.append(normal.log_prob(x.T).sum())
    return torch.stack(values)


def gaussian_model(affine: bool) -> NTM:
    if not affine:
        return NTM(None, GaussianOracle())
    block = AffineInTime(torch.tensor([0.4, -0.6, 0.9], dtype=F64), torch.tensor([0.3, 0.2, -0.5]))
    return NTM(Sequential(block.double()), GaussianOracle(block))


def gaussian_trajectories(steps: int, batch: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Forward trajectories of Gaussian data, with a different ``t_0`` per sample."""
    generator = torch.Generator().manual_seed(seed)
    x0 = MEAN + STD * torch.randn(batch, D, generator=generator, dtype=F64)
    t_min = torch.linspace(0.01, 0.9 / steps, batch, dtype=F64)
    times = UniformGrid()(steps, t_min)
    return sample_trajectory(x0, times, generator), times


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("affine", [False, True], ids=["identity", "affine_transporter"])
def test_score_denoising_is_the_exact_posterior_mean_for_gaussian_data(steps, affine):
    model = gaussian_model(affine)
    x, times = gaussian_trajectories(steps)
    # The oracle model's trajectory density is the forward process's (else the test is moot).
    torch.testing.assert_close(
        model.trajectory_log_prob(x, times), gaussian_log_joint(x, times), rtol=1e-11, atol=1e-9
    )
    u = torch.cat([model.transport(x[:, :steps], times[:, :steps], steps)[0], x[:, steps:]], 1)
    if affine:
        assert (u[:, :steps] - x[:, :steps]).abs().max() > 0.1
    expected = posterior_mean(x, times)
    levels = trajectory_score_denoise(model, u, times, all_levels=True)
    assert levels.shape == (5, steps, D)  # never an estimate at the t = 1 level
    # Tweedie holds at every level i < T; the output is the one at t_0.
    torch.testing.assert_close(levels, expected[:, None].expand_as(levels), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        trajectory_score_denoise(model, u, times), expected, rtol=1e-9, atol=1e-9
    )
    # The estimate is not just the noisy level rescaled: the score term matters.
    assert (x[:, 0] / (1 - times[:, :1]) - expected).abs().max() > 1e-3


def test_the_covariance_helper_is_the_forward_chain_covariance():
    """``S_ij`` of schedules.trajectory_covariance against the recursion, ``S_iT = 0``."""
    times = torch.tensor([0.03, 0.2, 0.55, 0.8, 1.0], dtype=F64)
    _, cov = forward_joint(times)
    # Covariance given x_0: remove the part that comes through x_0.
    scale = torch.cat([torch.ones(1, dtype=F64), 1 - times])
    given_x0 = cov[0] - STD[0] ** 2 * scale[:, None] * scale[None, :]
    torch.testing.assert_close(trajectory_covariance(times[:-1]), given_x0[1:-1, 1:-1])
    assert given_x0[1:-1, -1].abs().max() < 1e-12  # the t = 1 level is independent


def test_denoiser_targets_are_score_denoised_real_trajectories():
    model = gaussian_model(affine=True)
    x0 = MEAN + STD * torch.randn(6, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    u_t0, target = denoiser_targets(model, x0, steps=3, generator=torch.Generator().manual_seed(1))
    t0 = model.schedule.t_min_eval
    times = model.grid(3, torch.full((6,), t0, dtype=F64))
    x = sample_trajectory(x0, times, torch.Generator().manual_seed(1))
    torch.testing.assert_close(target, posterior_mean(x, times), rtol=1e-9, atol=1e-9)
    log_a, b = affine_coefficients(times[:, 0], *model.predictor.affine)
    torch.testing.assert_close(u_t0, x[:, 0] * log_a.exp() + b)
    assert not target.requires_grad and not u_t0.requires_grad


def test_sample_denoised_denoises_the_sampled_trajectory():
    model = gaussian_model(affine=True)
    x_t0, u = model.sample(7, steps=4, generator=torch.Generator().manual_seed(2), t_min=0.02,
                           return_trajectory=True)  # fmt: skip
    times = model.grid(4, torch.full((7,), 0.02, dtype=F64))
    log_a, b = affine_coefficients(times[:, :4], *model.predictor.affine)
    x = torch.cat([(u[:, :4] - b) * (-log_a).exp(), u[:, 4:]], dim=1)
    torch.testing.assert_close(x[:, 0], x_t0)
    denoised = sample_denoised(model, 7, steps=4, generator=torch.Generator().manual_seed(2),
                               t_min=0.02)  # fmt: skip
    torch.testing.assert_close(denoised, posterior_mean(x, times), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- nonlinear models
def coupling_model(cond_features: int = 0, seed: int = 0) -> NTM:
    torch.manual_seed(seed)
    coupling = {"features": D, "hidden_features": [16], "time_features": 8}
    transporter = Sequential(
        BLOCKS.build("affine_coupling", **coupling),
        BLOCKS.build("reverse"),
        BLOCKS.build("affine_coupling", **coupling, parity=True),
    )
    predictor = PREDICTORS.build(
        "mlp", features=D, hidden_features=[16, 16], time_features=8, cond_features=cond_features
    )
    model = NTM(transporter, predictor).double()
    return perturb_parameters(model, scale=0.3, seed=seed)


def token_model(level_attention: str = "markov", cond_features: int = 0, seed: int = 0) -> NTM:
    torch.manual_seed(seed)
    tarflow = {"features": 2, "tokens": 3, "dim": 16, "layers": 1, "heads": 2, "time_features": 8}
    transporter = Sequential(
        BLOCKS.build("tarflow", **tarflow), BLOCKS.build("tarflow", **tarflow, flip=True)
    )
    predictor = PREDICTORS.build(
        "trajectory_transformer", features=2, tokens=3, dim=16, layers=1, heads=2,
        time_features=8, level_attention=level_attention, cond_features=cond_features,
    )  # fmt: skip
    model = NTM(transporter, predictor).double()
    return perturb_parameters(model, scale=0.1, seed=seed)


def finite_difference_tweedie(model, x, times, y=None, step=1e-5) -> Tensor:
    """x̂_0 at t_0 with ∂L/∂x by central differences and S written out with min/max."""
    steps = times.shape[1] - 1
    score = torch.zeros_like(x[:, :steps])
    for k in range(steps):
        for d in range(D):
            plus, minus = x.clone(), x.clone()
            plus[:, k, d] += step
            minus[:, k, d] -= step
            nll_plus = -model.trajectory_log_prob(plus, times, y)
            nll_minus = -model.trajectory_log_prob(minus, times, y)
            score[:, k, d] = (nll_plus - nll_minus) / (2 * step)
    estimate = torch.zeros_like(x[:, 0])
    for j in range(steps):
        low = torch.minimum(times[:, 0], times[:, j])
        high = torch.maximum(times[:, 0], times[:, j])
        estimate -= (low**2 * (1 - high) / (1 - low))[:, None] * score[:, j]
    return (x[:, 0] + estimate) / (1 - times[:, :1])


def test_score_denoising_through_a_nonlinear_transporter_matches_finite_differences():
    model = coupling_model(cond_features=2)
    generator = torch.Generator().manual_seed(3)
    x0 = 0.5 + torch.randn(4, D, generator=generator, dtype=F64)
    times = UniformGrid()(3, torch.tensor([0.01, 0.05, 0.1, 0.2], dtype=F64))
    x = sample_trajectory(x0, times, generator)
    y = torch.randn(4, 2, generator=generator, dtype=F64)
    u = torch.cat([model.transport(x[:, :3], times[:, :3], 3)[0], x[:, 3:]], dim=1)
    # The transporter is far from the identity, also at t = 1 (where it must not be used).
    assert (u[:, :3] - x[:, :3]).abs().max() > 0.1
    ones = torch.ones(4, dtype=F64)
    assert (model.transport(x[:, 3:], ones[:, None], 3)[0] - x[:, 3:]).abs().max() > 0.1
    expected = finite_difference_tweedie(model, x, times, y)
    torch.testing.assert_close(
        trajectory_score_denoise(model, u, times, y), expected, rtol=1e-6, atol=1e-6
    )
    # The condition is used: the unconditional score gives another estimate.
    assert not torch.allclose(trajectory_score_denoise(model, u, times), expected, atol=1e-3)


def test_invert_trajectory_inverts_each_level_at_its_time_and_copies_the_top():
    model = token_model()
    generator = torch.Generator().manual_seed(0)
    times = UniformGrid()(4, torch.tensor([0.01, 0.04], dtype=F64))
    x = sample_trajectory(torch.randn(2, 3, 2, generator=generator, dtype=F64), times, generator)
    u = torch.cat([model.transport(x[:, :4], times[:, :4], 4)[0], x[:, 4:]], dim=1)
    x_again = invert_trajectory(model, u, times)
    torch.testing.assert_close(x_again, x, rtol=1e-7, atol=1e-7)
    assert torch.equal(x_again[:, -1], u[:, -1])


def test_tweedie_works_under_no_grad_and_leaves_the_model_without_gradients():
    model = coupling_model()
    x, times = gaussian_trajectories(steps=3, batch=2)
    with torch.no_grad():
        estimate = trajectory_tweedie(model, x, times)
    assert estimate.shape == (2, D) and torch.isfinite(estimate).all()
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("case", ["mlp", "mlp_cfg", "transformer_markov", "transformer_causal_cfg"])
def test_the_u_chain_is_the_one_ntm_sample_draws(case):
    cond = 2 if "cfg" in case else 0
    if case.startswith("mlp"):
        model, y, y_mask = coupling_model(cond_features=cond), None, None
        if cond:
            y = torch.randn(3, cond, dtype=F64)
    else:
        attention = "causal" if "causal" in case else "markov"
        model = token_model(attention, cond_features=cond)
        y = torch.randn(3, 2, cond, dtype=F64) if cond else None
        y_mask = torch.tensor([[True, True], [True, False], [True, True]]) if cond else None
    cfg = 1.5 if cond else 0.0
    kwargs = {"steps": 3, "cfg": cfg, "y": y, "y_mask": y_mask, "temperature": 0.9}
    x_t0, expected = model.sample(
        3, **kwargs, generator=torch.Generator().manual_seed(5), return_trajectory=True
    )
    u, times = sample_u_trajectory(model, 3, **kwargs, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(u, expected)
    torch.testing.assert_close(times[:, 0], torch.full((3,), model.schedule.t_min_eval, dtype=F64))
    # Guided sampling, conditional score: the same as denoising NTM.sample's trajectory.
    denoised = sample_denoised(model, 3, **kwargs, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        denoised, trajectory_score_denoise(model, expected, times, y, y_mask)
    )
    torch.testing.assert_close(invert_trajectory(model, u, times)[:, 0], x_t0)


def test_sample_with_denoiser_needs_no_inverse_and_no_score(monkeypatch):
    model = token_model(cond_features=4)
    denoiser = perturb_parameters(
        LearnedDenoiser(features=2, tokens=3, dim=16, layers=1, heads=2, cond_features=4).double()
    )
    y, y_mask = torch.randn(5, 2, 4, dtype=F64), torch.tensor([[True, False]] * 5)

    def forbidden(*args, **kwargs):
        raise AssertionError("the learned denoiser path must not call this")

    monkeypatch.setattr(model.transporter, "inverse", forbidden)
    monkeypatch.setattr(model, "trajectory_log_prob", forbidden)
    out = sample_with_denoiser(model, denoiser, 5, steps=2, cfg=1.0, y=y, y_mask=y_mask,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    u, _ = sample_u_trajectory(model, 5, steps=2, cfg=1.0, y=y, y_mask=y_mask,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(out, denoiser(u[:, 0], y, y_mask))
    assert (out - u[:, 0]).abs().max() > 1e-3  # the denoiser did something
    # An unconditional denoiser reads u_{t_0} only, also after a conditional chain.
    plain = perturb_parameters(LearnedDenoiser(features=2, tokens=3, dim=8, heads=2).double())
    out = sample_with_denoiser(model, plain, 5, steps=2, cfg=1.0, y=y, y_mask=y_mask,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(out, plain(u[:, 0]))
    with pytest.raises(AssertionError, match="must not call"):
        sample_denoised(model, 2, steps=2, y=y[:2], y_mask=y_mask[:2])


# --------------------------------------------------------------------------- learned denoiser
def test_learned_denoiser_fits_score_denoised_targets():
    torch.manual_seed(0)
    model = token_model()
    generator = torch.Generator().manual_seed(0)
    signs = torch.tensor([1.0, -1.0, 1.0], dtype=F64)[:, None]
    x0 = signs * (0.8 + 0.3 * torch.randn(64, 3, 2, generator=generator, dtype=F64))
    u_t0, target = denoiser_targets(model, x0, steps=3, generator=generator)
    denoiser = LearnedDenoiser(features=2, tokens=3, dim=32, layers=2, heads=4).double()
    # Untrained, it is the identity on u_{t_0} (the zero-initialised residual head).
    torch.testing.assert_close(denoiser(u_t0), u_t0)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = denoiser_loss(denoiser, u_t0, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses[:: len(losses) // 8]


@pytest.mark.parametrize("tokens", [None, 4], ids=["vectors", "tokens"])
def test_learned_denoiser_checkpoint_round_trip(tmp_path, tokens):
    denoiser = LearnedDenoiser(features=3, tokens=tokens, dim=16, layers=1, heads=2,
                               cond_features=5)  # fmt: skip
    perturb_parameters(denoiser, scale=0.1, seed=1)
    path = save_denoiser(tmp_path / "denoiser", denoiser, step=12)
    loaded = load_denoiser(path)
    assert isinstance(loaded, DENOISERS.get("transformer")) and loaded.spec == denoiser.spec
    u = torch.randn(2, *denoiser.event_shape)
    y = torch.randn(2, 5) if tokens is None else torch.randn(2, 3, 5)
    torch.testing.assert_close(loaded(u, y), denoiser(u, y))
    # Another model's checkpoint is not a denoiser.
    save_checkpoint(tmp_path / "other", nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="holds no denoiser"):
        load_denoiser(tmp_path / "other")


def test_learned_denoiser_masks_padding_and_reads_the_condition():
    denoiser = perturb_parameters(
        LearnedDenoiser(features=2, tokens=3, dim=16, layers=1, heads=2, cond_features=4), 0.2
    )
    u, y = torch.randn(2, 3, 2), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    other = y.clone()
    other[~mask] = 100.0
    torch.testing.assert_close(denoiser(u, other, mask), denoiser(u, y, mask))
    changed = y.clone()
    changed[:, 0] += 1.0
    assert (denoiser(u, changed, mask) - denoiser(u, y, mask)).abs().max() > 1e-3


# --------------------------------------------------------------------------- bad input
def test_bad_input_gets_a_clear_error():
    model = coupling_model()
    x, times = gaussian_trajectories(steps=2, batch=2)
    with pytest.raises(TypeError, match="expected an NTM"):
        trajectory_tweedie(nn.Linear(2, 2), x, times)
    with pytest.raises(ValueError, match=r"\(B, T \+ 1, 3\)"):
        trajectory_tweedie(model, x[:, :, :2], times)
    with pytest.raises(ValueError, match="ending at t_T = 1"):
        trajectory_tweedie(model, x, times * 0.9)
    with pytest.raises(ValueError, match="times of shape"):
        trajectory_score_denoise(model, x, times[:, 1:])
    nan = x.clone()
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        trajectory_score_denoise(model, nan, times)
    with pytest.raises(ValueError, match="steps"):
        sample_denoised(model, 2, steps=0)
    with pytest.raises(TypeError, match="dtype"):
        denoiser_targets(model, torch.zeros(2, D), steps=2)
    denoiser = LearnedDenoiser(features=D, dim=8, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        denoiser(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="cond_features=0"):
        denoiser(torch.zeros(2, D), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="shaped like u_t0"):
        denoiser_loss(denoiser, torch.zeros(2, D), torch.zeros(3, D))
    with pytest.raises(ValueError, match="divisible"):
        LearnedDenoiser(features=2, dim=10, heads=4)
    with pytest.raises(ValueError, match="event shape"):
        sample_with_denoiser(model, LearnedDenoiser(features=2, dim=8, heads=2), 2)
