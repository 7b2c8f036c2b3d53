"""The Normalizing Trajectory Model: exact trajectory likelihood, pair-wise estimate, loss,
sampling, classifier-free guidance and the data bound.

References are coded independently of ``NTM.gaussian`` (see ``ntm_helpers``): the posterior
coefficients are written out and the Gaussians are ``torch.distributions.Normal``.
"""

from __future__ import annotations

import math

import pytest
import torch
from ntm_helpers import (
    F64,
    D,
    coefficients,
    coupling_transporter,
    draw,
    mlp,
    per_level_log_probs,
    tarflow_transporter,
    transformer,
)
from torch import Tensor, nn
from torch.distributions import Normal

from trajflow import BLOCKS, NTM, Context, ScheduleConfig, Sequential
from trajflow.ntm import guided_gaussian
from trajflow.predictors import Predictor
from trajflow.schedules import UniformGrid, sample_trajectory
from trajflow.testing import perturb_parameters


# --------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("target", ["x0", "velocity"])
@pytest.mark.parametrize("empty", ["sequential", "none"])
def test_identity_transporter_gives_the_gaussian_chain_nll(target, empty):
    """Paper App. A.2: with f_T = id the NTM NLL is the NLL of a Gaussian reverse chain."""
    model = NTM(Sequential() if empty == "sequential" else None, mlp(target))
    trajectory, times = draw((D,), steps=3)
    top, terms = per_level_log_probs(model, trajectory, times)
    expected = top + terms.sum(1)
    log_prob = model.trajectory_log_prob(trajectory, times)
    assert log_prob.shape == (4,)
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-10)
    # δ is really in play (the learned variance), so the check is not about C alone.
    assert model.predictor(trajectory[:, 1:], times[:, 1:], times[:, :-1])[1].abs().min() > 0


@pytest.mark.parametrize("level_attention", ["markov", "causal"])
@pytest.mark.parametrize("target", ["x0", "velocity"])
def test_identity_check_with_the_trajectory_transformer(level_attention, target):
    model = NTM(None, transformer(level_attention, target))
    trajectory, times = draw((3, 2), steps=4, batch=3)
    top, terms = per_level_log_probs(model, trajectory, times)
    torch.testing.assert_close(
        model.trajectory_log_prob(trajectory, times), top + terms.sum(1), rtol=1e-12, atol=1e-10
    )


def test_time_conditioned_transporter_log_prob_by_hand():
    transporter = coupling_transporter()
    model = NTM(transporter, mlp("velocity"))
    trajectory, times = draw((D,), steps=4)
    top, terms = per_level_log_probs(model, trajectory, times, transporter)
    log_prob = model.trajectory_log_prob(trajectory, times)
    torch.testing.assert_close(log_prob, top + terms.sum(1), rtol=1e-12, atol=1e-10)
    # Each factor on its own, the steps clean-most first and the top level last.
    factors = model.factor_log_probs(trajectory, times)
    torch.testing.assert_close(factors[:, :-1], terms, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(factors[:, -1], top, rtol=1e-12, atol=1e-10)
    # The transporter is not the identity and reads t and T.
    ctx = Context(t=times[:, 0], steps=torch.full((4,), 4))
    u, logdet = transporter(trajectory[:, 0], ctx)
    assert (u - trajectory[:, 0]).abs().max() > 1e-2 and logdet.abs().min() > 1e-4
    other_t = transporter(trajectory[:, 0], Context(t=times[:, 1], steps=ctx.steps))[0]
    other_steps = transporter(trajectory[:, 0], Context(t=ctx.t, steps=ctx.steps * 2))[0]
    assert not torch.allclose(u, other_t) and not torch.allclose(u, other_steps)
    # The log-det the model adds is that of the Jacobian (slogdet), at one level.
    jacobian = torch.autograd.functional.jacobian(
        lambda x: transporter(x[None], ctx.map(lambda v: v[:1]))[0][0], trajectory[0, 0]
    )
    torch.testing.assert_close(
        torch.linalg.slogdet(jacobian).logabsdet, logdet[0], rtol=1e-10, atol=1e-10
    )
    # And the likelihood differs from the identity-transporter model's.
    identity = NTM(None, model.predictor)
    assert not torch.allclose(identity.trajectory_log_prob(trajectory, times), log_prob)


def test_tarflow_transporter_with_causal_transformer_by_hand():
    transporter = tarflow_transporter()
    model = NTM(transporter, transformer("causal"))
    trajectory, times = draw((3, 2), steps=3, batch=3)
    top, terms = per_level_log_probs(model, trajectory, times, transporter)
    torch.testing.assert_close(
        model.trajectory_log_prob(trajectory, times), top + terms.sum(1), rtol=1e-10, atol=1e-9
    )


def test_pairwise_is_an_unbiased_estimate_of_the_trajectory_nll():
    transporter = coupling_transporter()
    model = NTM(transporter, mlp())
    trajectory, times = draw((D,), steps=4, batch=1, seed=3)
    n = 2000
    many, many_times = trajectory.expand(n, -1, -1), times.expand(n, -1)
    estimate, _, _ = model._pairwise_log_prob(
        many, many_times, None, None, None, torch.Generator().manual_seed(0)
    )
    end_to_end = model.trajectory_log_prob(trajectory, times)[0]
    # Every draw is log N(x_1) + T · (one level's term) ...
    top, terms = per_level_log_probs(model, trajectory, times, transporter)
    candidates = top[0] + 4 * terms[0]
    distance = (estimate[:, None] - candidates[None, :]).abs()
    assert distance.min(1).values.max().item() < 1e-9
    assert set(distance.argmin(1).tolist()) == {0, 1, 2, 3}  # the top pair k = T-1 included
    # ... whose uniform average is exactly the end-to-end value,
    torch.testing.assert_close(candidates.mean(), end_to_end, rtol=1e-12, atol=1e-10)
    # ... and the Monte Carlo average agrees within its standard error.
    error = estimate.std() / math.sqrt(n)
    assert (estimate.mean() - end_to_end).abs() < 4 * error, (estimate.mean(), end_to_end, error)


def test_pairwise_alignment_loss_scores_the_sampled_pair():
    """In pair-wise mode the auxiliary loss is ‖μ_P - μ_FM‖² on the same random step k as the
    NLL term: replaying k, it equals the mean of the per-level errors at the drawn k, whose
    uniform average over k is exactly the end-to-end auxiliary loss."""
    from trajflow import FlowMatching

    fm = FlowMatching(mlp("velocity"))
    perturb_parameters(fm.net, scale=0.3, seed=4)
    model = NTM.from_flow_matching(fm, coupling_transporter(), mode="pairwise")
    trajectory, times = draw((D,), steps=4, batch=1, seed=5)
    steps = 4
    u, _ = model.transport(trajectory[:, :-1], times[:, :-1], steps)
    u_in = torch.cat([u[:, 1:], trajectory[:, -1:]], dim=1)
    mean, _ = model.gaussian(u_in, times[:, 1:], times[:, :-1], steps)
    target = model._teacher_mean(trajectory[:, 1:], times[:, 1:], times[:, :-1], None, None, None)
    per_level = (mean - target).square().mean(-1)[0]  # (T,)
    assert per_level.min() > 1e-6  # the transporter and the perturbation make it non-trivial
    full = model._alignment_loss(trajectory, times, steps, None, None, None)
    torch.testing.assert_close(per_level.mean(), full, rtol=1e-12, atol=1e-14)
    n = 64
    many, many_times = trajectory.expand(n, -1, -1), times.expand(n, -1)
    _, aux, _ = model._pairwise_log_prob(
        many, many_times, None, None, None, torch.Generator().manual_seed(0), with_aux=True
    )
    k = torch.randint(0, steps, (n,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aux, per_level[k].mean(), rtol=1e-10, atol=1e-14)


def test_pairwise_with_a_causal_predictor_is_rejected():
    """Step k of a causal predictor reads every noisier level, which one pair does not hold:
    pairwise mode is refused at construction and as a per-call override."""
    match = "pairwise mode needs a markov predictor"
    with pytest.raises(ValueError, match=match):
        NTM(None, transformer("causal"), mode="pairwise")
    model = NTM(None, transformer("causal"))
    trajectory, _ = draw((3, 2), steps=4, batch=2, seed=3)
    with pytest.raises(ValueError, match=match):
        model.loss(trajectory[:, 0], mode="pairwise", generator=torch.Generator().manual_seed(0))
    out = model.loss(trajectory[:, 0], generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out.nll).all())


def test_pairwise_mode_in_loss_matches_the_hand_estimate():
    """Replaying the seeded draws (T, t_min, trajectory, then one pair index k per sample),
    each sample's NLL is -(log N(x_1) + T · term_k) with the terms computed independently."""
    from trajflow.schedules import draw_steps, draw_t_min

    transporter = coupling_transporter()
    schedule = ScheduleConfig(steps=[2, 4])
    model = NTM(transporter, mlp(), schedule, mode="pairwise")
    batch = 8
    x0 = torch.randn(batch, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = model.loss(x0, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    steps = draw_steps(schedule.steps, generator)
    t_min = draw_t_min(batch, schedule.t_min_low, schedule.t_min_high, generator)
    times = schedule.build()(steps, t_min)
    trajectory = sample_trajectory(x0, times, generator)
    k = torch.randint(0, steps, (batch,), generator=generator)
    assert steps == 4 and set(k.tolist()) == {0, 1, 2, 3}  # the top pair k = T-1 included
    top, terms = per_level_log_probs(model, trajectory, times, transporter)
    expected = -(top + steps * terms[torch.arange(batch), k])
    assert out.steps == steps
    torch.testing.assert_close(out.nll, expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, expected.mean() / D, rtol=1e-10, atol=1e-10)
    end_to_end = model.loss(x0, mode="end_to_end", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(end_to_end.nll, -(top + terms.sum(1)).detach())


def test_loss_is_the_trajectory_nll_of_seeded_draws():
    from trajflow.schedules import draw_steps, draw_t_min

    schedule = ScheduleConfig(grid="shifted", shift=0.4, steps=[2, 3, 5])
    model = NTM(coupling_transporter(), mlp(), schedule)
    x0 = torch.randn(5, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = model.loss(x0, generator=torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    steps = draw_steps(schedule.steps, generator)
    t_min = draw_t_min(5, schedule.t_min_low, schedule.t_min_high, generator)
    times = schedule.build()(steps, t_min)
    trajectory = sample_trajectory(x0, times, generator)
    nll = -model.trajectory_log_prob(trajectory, times)
    assert out.steps == steps
    torch.testing.assert_close(out.nll, nll.detach())
    torch.testing.assert_close(out.loss, nll.mean() / D)
    torch.testing.assert_close(out.bits_per_dim, nll.detach() / (D * math.log(2)))
    assert out.aux is None


@pytest.mark.parametrize("mode", ["end_to_end", "pairwise"])
def test_loss_is_finite_and_gradients_reach_every_part(mode):
    model = NTM(coupling_transporter(), mlp(), ScheduleConfig(steps=[2, 4]), mode=mode)
    x0 = torch.randn(16, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = model.loss(x0, generator=torch.Generator().manual_seed(2))
    assert out.loss.dim() == 0 and bool(torch.isfinite(out.loss))
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert bool(torch.isfinite(parameter.grad).all()), name
        assert parameter.grad.abs().max() > 0, name


def test_conditional_loss_with_prompt_dropout():
    model = NTM(coupling_transporter(), mlp(cond_features=4), cfg_dropout=0.5)
    x0 = torch.randn(8, D, dtype=F64)
    y = torch.randn(8, 4, dtype=F64)
    out = model.loss(x0, y, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.predictor.null.grad.abs().max() > 0  # some rows were dropped
    assert bool(torch.isfinite(out.nll).all())


@pytest.mark.parametrize("mode", ["end_to_end", "pairwise"])
def test_prompt_dropout_drops_a_cfg_dropout_fraction(mode):
    """The predictor sees drop=True for about cfg_dropout of the rows, not 1 - cfg_dropout (an
    asymmetric rate: cfg_dropout=0.5 cannot tell a flipped comparison)."""
    model = NTM(None, mlp(cond_features=4), cfg_dropout=0.1, mode=mode)
    drops = []
    model.predictor.register_forward_pre_hook(lambda module, args: drops.append(args[6]))
    n = 4000
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, D, dtype=F64, generator=generator)
    y = torch.randn(n, 4, dtype=F64, generator=generator)
    model.loss(x0, y, generator=generator)
    assert len(drops) == 1 and drops[0].dtype == torch.bool and drops[0].shape == (n,)
    fraction = drops[0].double().mean().item()
    # Binomial(n, 0.1) / n: standard deviation sqrt(0.1 · 0.9 / n) ≈ 0.005.
    assert abs(fraction - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n), fraction
    model.loss(x0, generator=generator)  # no condition: nothing to drop
    assert drops[1] is None


# --------------------------------------------------------------------------- transporter time
def tarflow_spec(time_features: int) -> dict:
    kwargs = {"features": 2, "tokens": 3, "dim": 16, "layers": 1, "heads": 2}
    return {"name": "tarflow", "kwargs": {**kwargs, "time_features": time_features}}


def coupling_spec(time_features: int, name: str = "affine_coupling") -> dict:
    kwargs = {"features": D, "hidden_features": [8], "time_features": time_features}
    return {"name": name, "kwargs": kwargs}


@pytest.mark.parametrize(
    ("specs", "event"),
    [
        ([tarflow_spec(0)], (3, 2)),
        ([tarflow_spec(0), tarflow_spec(0)], (3, 2)),
        ([coupling_spec(0)], (D,)),
        ([coupling_spec(0, "spline_coupling"), {"name": "reverse"}], (D,)),
        ([{"name": "lu_linear", "kwargs": {"features": D}}], (D,)),
    ],
    ids=["tarflow", "two-tarflows", "affine", "spline-reverse", "lu-linear"],
)
def test_a_transporter_that_ignores_time_needs_an_explicit_opt_in(specs, event):
    """Issue 6, item 3: time_features=0 inside an NTM is an accident unless asked for."""
    predictor = mlp() if event == (D,) else transformer("markov")
    transporter = Sequential.from_specs(specs).double()
    assert not transporter.uses_time
    with pytest.raises(ValueError, match=r"none of its blocks reads ctx\.t") as error:
        NTM(transporter, predictor)
    assert "time_features > 0" in str(error.value)
    assert "time_independent_transporter=True" in str(error.value)
    model = NTM(transporter, predictor, time_independent_transporter=True)
    x0 = torch.randn(4, *event, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(model.loss(x0).nll).all())


@pytest.mark.parametrize(
    "specs",
    [
        [],
        [coupling_spec(8)],
        [{"name": "reverse"}, coupling_spec(8, "spline_coupling")],  # one block reading t suffices
        [{"name": "lu_linear", "kwargs": {"features": D}}, coupling_spec(8, "additive_coupling")],
    ],
    ids=["identity", "affine", "reverse-spline", "lu-additive"],
)
def test_time_conditioned_and_identity_transporters_are_accepted(specs):
    transporter = Sequential.from_specs(specs).double()
    assert transporter.uses_time == bool(specs)
    model = NTM(transporter, mlp())
    assert model.loss(torch.randn(4, D, dtype=F64)).nll.shape == (4,)
    assert len(NTM(None, mlp()).transporter) == 0  # None is the identity too


def test_uses_time_sees_inverted_and_custom_blocks():
    coupling = BLOCKS.build("affine_coupling", features=D, time_features=8)
    assert coupling.uses_time and coupling.inv.uses_time
    assert not BLOCKS.build("affine_coupling", features=D).inv.uses_time
    assert BLOCKS.build("tarflow", **tarflow_spec(4)["kwargs"]).uses_time
    assert not BLOCKS.build("tarflow", **tarflow_spec(0)["kwargs"]).uses_time

    class Shift(type(BLOCKS.build("reverse"))):  # a custom block reading ctx.t directly
        uses_time = True

    NTM(Sequential(Shift()), mlp())


def test_model_config_passes_the_opt_in_on():
    from pydantic import ValidationError

    from trajflow.config import ModelConfig

    predictor = {"name": "mlp", "kwargs": {"features": D, "hidden_features": [8]}}
    config = ModelConfig(predictor=predictor, transporter=[coupling_spec(0)])
    with pytest.raises(ValueError, match="time_independent_transporter=True"):
        config.build()
    opted_in = config.model_copy(update={"time_independent_transporter": True})
    assert isinstance(opted_in.build(), NTM)
    with pytest.raises(ValidationError, match="time_independent_transporter"):
        ModelConfig(predictor=predictor, time_independent_transporter="maybe")


def test_input_checks():
    model = NTM(None, mlp())
    with pytest.raises(ValueError, match=r"NTM.loss expected x0 of shape \(B, 3\)"):
        model.loss(torch.randn(4, 2, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        model.loss(torch.zeros(4, D, dtype=torch.long))
    trajectory, times = draw((D,))
    with pytest.raises(ValueError, match=r"trajectory of shape \(B, T \+ 1, 3\)"):
        model.trajectory_log_prob(trajectory[..., :2], times)
    with pytest.raises(ValueError, match="T >= 1"):
        model.trajectory_log_prob(trajectory[:, :1], times[:, :1])
    with pytest.raises(ValueError, match="expected times of shape"):
        model.trajectory_log_prob(trajectory, times[:, :-1])
    with pytest.raises(ValueError, match="expected mode 'end_to_end' or 'pairwise'"):
        NTM(None, mlp(), mode="stepwise")
    with pytest.raises(ValueError, match="cfg_dropout"):
        NTM(None, mlp(), cfg_dropout=1.0)


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("steps", [1, 3])
def test_sample_shapes_seeds_and_trajectory(steps):
    model = NTM(coupling_transporter(), mlp())
    seeded = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    x = model.sample(5, steps=steps, generator=seeded(0))
    assert x.shape == (5, D) and x.dtype == F64 and bool(torch.isfinite(x).all())
    assert torch.equal(x, model.sample(5, steps=steps, generator=seeded(0)))
    assert not torch.allclose(x, model.sample(5, steps=steps, generator=seeded(1)))
    x2, trajectory = model.sample(5, steps=steps, generator=seeded(0), return_trajectory=True)
    assert trajectory.shape == (5, steps + 1, D)
    assert torch.equal(x2, x)
    ctx = Context(t=torch.full((5,), 1e-3, dtype=F64), steps=torch.full((5,), steps))
    torch.testing.assert_close(model.transporter.inverse(trajectory[:, 0], ctx)[0], x)


def test_temperature_zero_is_deterministic():
    model = NTM(coupling_transporter(), mlp())
    a = model.sample(4, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(0))
    b = model.sample(4, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.allclose(a, a[:1].expand_as(a))  # every sample is the same point


@pytest.mark.parametrize(
    "net", ["mlp", "markov", "causal"], ids=["mlp", "transformer-markov", "transformer-causal"]
)
def test_sampler_draws_from_the_model_it_scores(net):
    """The sampler's u-trajectory, scored by the parallel pass, gives back its seeded noise."""
    if net == "mlp":
        predictor, transporter, event = mlp("velocity"), coupling_transporter(), (D,)
    else:
        predictor, transporter, event = transformer(net), tarflow_transporter(), (3, 2)
    model = NTM(transporter, predictor)
    n, steps, temperature = 3, 4, 0.7
    x, u = model.sample(
        n,
        steps=steps,
        temperature=temperature,
        generator=torch.Generator().manual_seed(4),
        return_trajectory=True,
        t_min=0.01,
    )
    generator = torch.Generator().manual_seed(4)
    noises = [torch.randn((n, *event), generator=generator, dtype=F64) for _ in range(steps + 1)]
    times = UniformGrid()(steps, torch.full((n,), 0.01, dtype=F64))
    mean, log_std = model.gaussian(u[:, 1:], times[:, 1:], times[:, :-1], steps)
    z = (u[:, :-1] - mean) / (temperature * torch.exp(log_std))
    torch.testing.assert_close(u[:, -1], temperature * noises[0], rtol=0, atol=1e-12)
    for k in range(steps):  # level k was drawn (steps - k)-th
        torch.testing.assert_close(z[:, k], noises[steps - k], rtol=1e-8, atol=1e-8)
    ctx = Context(t=times[:, 0], steps=torch.full((n,), steps))
    torch.testing.assert_close(x, model.transporter.inverse(u[:, 0], ctx)[0])


# --------------------------------------------------------------------------- guidance
def random_gaussians(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    mean_c, mean_u = torch.randn(2, 6, generator=generator, dtype=F64)
    std_c, std_u = 0.1 + torch.rand(2, 6, generator=generator, dtype=F64)
    return mean_c, std_c, mean_u, std_u


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_guided_gaussian_formula(weight):
    mean_c, std_c, mean_u, std_u = random_gaussians()
    mean, std = guided_gaussian(mean_c, std_c, mean_u, std_u, weight)
    for i in range(6):
        r = min((std_c[i].item() / std_u[i].item()) ** 2, 1.0)
        norm = 1 + weight - weight * r
        expected_mean = ((1 + weight) * mean_c[i].item() - weight * r * mean_u[i].item()) / norm
        assert mean[i].item() == pytest.approx(expected_mean, rel=1e-12, abs=1e-12)
        assert std[i].item() == pytest.approx(std_c[i].item() / math.sqrt(norm), rel=1e-12)
    # w = 0 is the conditional step.
    mean0, std0 = guided_gaussian(mean_c, std_c, mean_u, std_u, 0.0)
    torch.testing.assert_close(mean0, mean_c, rtol=0, atol=0)
    torch.testing.assert_close(std0, std_c, rtol=0, atol=0)
    # σ_c = σ_u: plain extrapolation of the mean, σ unchanged.
    mean1, std1 = guided_gaussian(mean_c, std_c, mean_u, std_c.clone(), weight)
    torch.testing.assert_close(mean1, (1 + weight) * mean_c - weight * mean_u)
    torch.testing.assert_close(std1, std_c)
    # σ_c > σ_u: the ratio is clamped at 1, same as above.
    mean2, std2 = guided_gaussian(mean_c, 2 * std_u, mean_u, std_u, weight)
    torch.testing.assert_close(mean2, (1 + weight) * mean_c - weight * mean_u)
    torch.testing.assert_close(std2, 2 * std_u)


def test_sample_with_guidance_follows_the_guided_step():
    model = NTM(coupling_transporter(), mlp(cond_features=4))
    n, steps, weight = 4, 2, 2.0
    y = torch.randn(n, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    seeded = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    x, u = model.sample(n, steps, cfg=weight, y=y, generator=seeded(), return_trajectory=True)
    plain = model.sample(n, steps, cfg=0.0, y=y, generator=seeded())
    assert x.shape == (n, D) and bool(torch.isfinite(x).all())
    assert not torch.allclose(x, plain)
    # Step by step: conditional and null-condition Gaussians, combined by the formula.
    generator = seeded()
    noises = [torch.randn((n, D), generator=generator, dtype=F64) for _ in range(steps + 1)]
    times = UniformGrid()(steps, torch.full((n,), 1e-3, dtype=F64))
    level = noises[0]
    for k in range(steps - 1, -1, -1):
        t_in, t_out = times[:, k + 1 : k + 2], times[:, k : k + 1]
        mean_c, log_c = model.gaussian(level[:, None], t_in, t_out, steps, y)
        drop = torch.ones(n, dtype=torch.bool)
        mean_u, log_u = model.gaussian(level[:, None], t_in, t_out, steps, y, drop=drop)
        mean, std = guided_gaussian(
            mean_c[:, 0], log_c[:, 0].exp(), mean_u[:, 0], log_u[:, 0].exp(), weight
        )
        level = mean + std * noises[steps - k]
        torch.testing.assert_close(u[:, k], level, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("weight", [-0.5, -1.0, -3.0, math.nan, math.inf, -math.inf])
def test_guidance_weight_must_be_finite_and_non_negative(weight):
    """Below -1 the guided variance is negative (NaN); no negative weight is meaningful."""
    mean_c, std_c, mean_u, std_u = random_gaussians()
    with pytest.raises(
        ValueError,
        match=r"guided_gaussian expected the guidance weight w to be a finite number >= 0",
    ) as error:
        guided_gaussian(mean_c, std_c, mean_u, std_u, weight)
    assert repr(weight) in str(error.value)
    model = NTM(coupling_transporter(), mlp(cond_features=4))
    y = torch.randn(2, 4, dtype=F64)
    with pytest.raises(
        ValueError, match=r"NTM\.sample expected the guidance weight cfg to be a finite number >= 0"
    ):
        model.sample(2, steps=2, cfg=weight, y=y)
    with pytest.raises(TypeError, match="guidance weight cfg"):
        model.sample(2, steps=2, cfg="2", y=y)


def test_guidance_needs_a_conditional_predictor():
    model = NTM(None, mlp())
    with pytest.raises(ValueError, match="cond_features > 0"):
        model.sample(2, steps=2, cfg=1.0)


# --------------------------------------------------------------------------- data bound
class ExactGaussianPredictor(Predictor):
    """The true reverse steps of data ``x_0 ~ N(m, s² I)``: with it, model joint = forward joint.

    ``x̂_0 = E[x_0 | x_t]`` and ``δ`` such that ``σ² = C² + B² Var(x_0 | x_t)``; the data
    bound is then exactly ``log q(x_{t_0})``. With ``exact_variance=False`` (``δ = 0``) the
    model is mis-specified and the bound is strictly lower on average.
    """

    def __init__(self, mean: Tensor, std: float, exact_variance: bool = True):
        super().__init__("x0", 0, 2)
        self.mean = nn.Parameter(mean.clone())
        self.std = std
        self.exact_variance = exact_variance

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def forward(self, u, t_in, t_out=None, steps=None, y=None, y_mask=None, drop=None):
        t = t_in[..., None].to(u)
        s = t_out[..., None].to(u)
        var_data = self.std**2
        marginal = (1 - t) ** 2 * var_data + t**2
        clean = self.mean + (1 - t) * var_data * (u - (1 - t) * self.mean) / marginal
        clean_var = var_data * t**2 / marginal
        _, b, c = coefficients(s, t)
        if not self.exact_variance:
            return clean, torch.zeros_like(u)
        delta = 0.5 * torch.log((c**2 + b**2 * clean_var) / c**2)
        return clean, delta.expand_as(u)


def exact_log_density(x_t0: Tensor, mean: Tensor, std: float, t0: float) -> Tensor:
    variance = (1 - t0) ** 2 * std**2 + t0**2
    return Normal((1 - t0) * mean, math.sqrt(variance)).log_prob(x_t0).sum(-1)


@pytest.mark.parametrize(
    ("mean", "std", "t0", "steps"),
    [((0.0, 0.0, 0.0), 1.0, 1e-3, 4), ((1.0, -2.0, 0.5), 0.3, 0.02, 3)],
)
def test_data_bound_is_exact_for_the_true_reverse_chain(mean, std, t0, steps):
    mean = torch.tensor(mean, dtype=F64)
    model = NTM(None, ExactGaussianPredictor(mean, std))
    x = mean + std * torch.randn(64, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    bound = model.data_bound(x, steps=steps, t0=t0, generator=torch.Generator().manual_seed(1))
    # The same seed reproduces the forward trajectory data_bound drew, hence x_{t_0}.
    times = UniformGrid()(steps, torch.full((64,), t0, dtype=F64))
    x_t0 = sample_trajectory(x, times, torch.Generator().manual_seed(1))[:, 0]
    exact = exact_log_density(x_t0, mean, std, t0)
    torch.testing.assert_close(bound.log_likelihood, exact, rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(bound.bits_per_dim, -exact / (D * math.log(2)))
    assert f"t0 = {t0:g}" in bound.variable and f"T = {steps}" in bound.variable
    assert "K =" not in bound.variable
    # Several Monte Carlo trajectories average the bound of each drawn x_{t_0}.
    averaged = model.data_bound(
        x, steps=steps, t0=t0, samples=3, generator=torch.Generator().manual_seed(1)
    )
    generator = torch.Generator().manual_seed(1)
    draws = [
        exact_log_density(sample_trajectory(x, times, generator)[:, 0], mean, std, t0)
        for _ in range(3)
    ]
    torch.testing.assert_close(averaged.log_likelihood, sum(draws) / 3, rtol=1e-9, atol=1e-8)


def test_data_bound_is_below_the_true_log_density_for_a_misspecified_model():
    """Data N(0, I) and the plain ancestral variances (δ = 0): a strict bound on average."""
    mean, std, t0, steps, n = torch.zeros(D, dtype=F64), 1.0, 1e-3, 4, 4000
    model = NTM(None, ExactGaussianPredictor(mean, std, exact_variance=False))
    x = torch.randn(n, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    bound = model.data_bound(x, steps=steps, t0=t0, generator=torch.Generator().manual_seed(1))
    times = UniformGrid()(steps, torch.full((n,), t0, dtype=F64))
    x_t0 = sample_trajectory(x, times, torch.Generator().manual_seed(1))[:, 0]
    gap = exact_log_density(x_t0, mean, std, t0) - bound.log_likelihood
    assert bool(torch.isfinite(bound.log_likelihood).all())
    error = gap.std() / math.sqrt(n)
    assert gap.mean() > 5 * error, (gap.mean(), error)


def test_data_bound_bits_per_dim_with_quantisation_and_default_t0():
    model = NTM(None, mlp(), ScheduleConfig(t_min_eval=0.004))
    x = torch.rand(8, D, dtype=F64) * 2 - 1
    bound = model.data_bound(
        x, steps=2, quantization_levels=256, generator=torch.Generator().manual_seed(0)
    )
    expected = (-bound.log_likelihood - D * math.log(2 / 256)) / (D * math.log(2))
    torch.testing.assert_close(bound.bits_per_dim, expected)
    assert "t0 = 0.004" in bound.variable and "T = 2" in bound.variable
    assert "K = 256" in bound.variable
    assert bound.log_likelihood.shape == (8,) and bool(torch.isfinite(bound.log_likelihood).all())
