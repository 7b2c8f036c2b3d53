"""The NTM's optional x̂₀ regression term (``x0_mse_weight``): its value in both training
modes, its gradient (``u_out`` is a target) and how it is configured.

The reference writes the term as ``(u_out - A u_in) / B - x̂_0``, the clean point a step's
endpoints imply minus the predicted one, with the coefficients of ``ntm_helpers``.
"""

from __future__ import annotations

import pytest
import torch
from ntm_helpers import F64, D, coefficients, coupling_transporter, mlp
from pydantic import ValidationError
from torch import Tensor

from trajflow import NTM, Context, FlowMatching, ScheduleConfig
from trajflow.config import ModelConfig, toy_flow_matching_config, toy_ntm_config
from trajflow.schedules import draw_steps, draw_t_min, sample_trajectory

SCHEDULE = ScheduleConfig(steps=[2, 4])


def replay(model: NTM, x0: Tensor, seed: int) -> tuple[int, Tensor, Tensor, torch.Generator]:
    """The draws of ``model.loss(x0, generator=seed)``: ``(T, trajectory, times, generator)``."""
    generator = torch.Generator().manual_seed(seed)
    steps = draw_steps(model.schedule.steps, generator)
    t_min = draw_t_min(x0.shape[0], model.schedule.t_min_low, model.schedule.t_min_high, generator)
    times = model.schedule.build()(steps, t_min)
    return steps, sample_trajectory(x0, times, generator), times, generator


def clean_point_errors(model: NTM, trajectory: Tensor, times: Tensor) -> Tensor:
    """``(sg(u_k) - A u_{k+1}) / B - x̂_0`` per sample, step and dimension ``(B, T, D)``."""
    batch, levels = times.shape
    steps = levels - 1
    ctx = Context(t=times[:, :steps].reshape(-1), steps=torch.full((batch * steps,), steps))
    u, _ = model.transporter(trajectory[:, :steps].flatten(0, 1), ctx)
    u = u.unflatten(0, (batch, steps))
    u_in = torch.cat([u[:, 1:], trajectory[:, -1:]], dim=1)
    head, _ = model.predictor(u_in, times[:, 1:], times[:, :-1], torch.full((batch,), steps))
    s, t = times[:, :-1, None], times[:, 1:, None]
    a, b, _ = coefficients(s, t)
    clean = head if model.predictor.target == "x0" else u_in - t * head
    return (u.detach() - a * u_in) / b - clean


def model_pair(weight: float, mode: str, target: str = "x0") -> tuple[NTM, NTM]:
    """The same NTM with and without the term (the transporter and predictor shared)."""
    with_term = NTM(coupling_transporter(), mlp(target), SCHEDULE, mode, x0_mse_weight=weight)
    without = NTM(with_term.transporter, with_term.predictor, SCHEDULE, mode)
    return with_term, without


def data(batch: int = 8) -> Tensor:
    return 0.5 + torch.randn(batch, D, dtype=F64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", ["x0", "velocity"])
def test_end_to_end_term_is_the_mean_clean_point_error_over_every_step(target):
    model, plain = model_pair(0.7, "end_to_end", target)
    x0 = data()
    out = model.loss(x0, generator=torch.Generator().manual_seed(3))
    reference = plain.loss(x0, generator=torch.Generator().manual_seed(3))
    _, trajectory, times, _ = replay(model, x0, 3)
    expected = clean_point_errors(model, trajectory, times).square().mean()
    assert expected > 1e-3  # the perturbed model is far from exact
    torch.testing.assert_close(out.x0_mse, expected, rtol=1e-10, atol=1e-12)
    # The reported NLL is untouched; the loss adds λ times the term.
    torch.testing.assert_close(out.nll, reference.nll, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, reference.loss + 0.7 * expected, rtol=1e-10, atol=1e-12)
    assert reference.x0_mse is None


def test_pairwise_term_scores_the_sampled_step():
    model, plain = model_pair(1.5, "pairwise")
    x0 = data()
    out = model.loss(x0, generator=torch.Generator().manual_seed(7))
    reference = plain.loss(x0, generator=torch.Generator().manual_seed(7))
    steps, trajectory, times, generator = replay(model, x0, 7)
    k = torch.randint(0, steps, (x0.shape[0],), generator=generator)
    assert steps == 4 and len(set(k.tolist())) > 2
    per_step = clean_point_errors(model, trajectory, times).square().mean(-1)  # (B, T)
    expected = per_step[torch.arange(x0.shape[0]), k].mean()
    torch.testing.assert_close(out.x0_mse, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.nll, reference.nll, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, reference.loss + 1.5 * expected, rtol=1e-10, atol=1e-12)


def test_pairwise_term_is_an_unbiased_estimate_of_the_end_to_end_term():
    """One trajectory repeated: the pair-wise draws average to the end-to-end value."""
    model, _ = model_pair(1.0, "pairwise")
    x0 = data(1)
    _, trajectory, times, _ = replay(model, x0, 5)
    n = 4000
    many, many_times = trajectory.expand(n, -1, -1), times.expand(n, -1)
    _, _, estimate = model._pairwise_log_prob(
        many, many_times, None, None, None, torch.Generator().manual_seed(0), with_x0_mse=True
    )
    per_step = clean_point_errors(model, trajectory, times).square().mean(-1)[0]  # (T,)
    _, end_to_end = model._factor_log_probs(trajectory, times, None, None, None, True)
    torch.testing.assert_close(per_step.mean(), end_to_end, rtol=1e-10, atol=1e-12)
    spread = per_step.std() / (n**0.5)
    assert (estimate - end_to_end).abs() < 4 * spread, (estimate, end_to_end, spread)


@pytest.mark.parametrize("mode", ["end_to_end", "pairwise"])
def test_the_term_treats_u_out_as_a_target(mode):
    """λ ∇(term) is the loss gradient's change: u_out is detached, u_in and x̂₀ are not."""
    model, plain = model_pair(0.5, mode)
    x0 = data()
    parameters = list(model.parameters())
    with_term = torch.autograd.grad(
        model.loss(x0, generator=torch.Generator().manual_seed(2)).loss, parameters
    )
    without = torch.autograd.grad(
        plain.loss(x0, generator=torch.Generator().manual_seed(2)).loss, parameters
    )
    steps, trajectory, times, generator = replay(model, x0, 2)
    errors = clean_point_errors(model, trajectory, times).square()
    if mode == "pairwise":
        k = torch.randint(0, steps, (x0.shape[0],), generator=generator)
        errors = errors[torch.arange(x0.shape[0]), k]
    expected = torch.autograd.grad(0.5 * errors.mean(), parameters, allow_unused=True)
    transporter_moved = False
    for name, a, b, e in zip(
        [n for n, _ in model.named_parameters()], with_term, without, expected, strict=True
    ):
        e = torch.zeros_like(a) if e is None else e
        # a - b cancels the NLL's gradient, ~1e3 times larger: float64 keeps ~1e-9 of it.
        torch.testing.assert_close(a - b, e, rtol=1e-6, atol=1e-6, msg=name)
        transporter_moved |= name.startswith("transporter.") and e.abs().max() > 0
    assert transporter_moved  # through u_in, the level above


def test_weight_is_validated_and_carried_by_the_config():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="x0_mse_weight"):
            NTM(None, mlp(), x0_mse_weight=bad)
    with pytest.raises(ValidationError, match="x0_mse_weight"):
        toy_ntm_config(x0_mse_weight=-1.0)
    fm = toy_flow_matching_config(predictor_hidden=[8])
    with pytest.raises(ValidationError, match="x0_mse_weight is an NTM setting"):
        ModelConfig(**{**fm.model_dump(), "x0_mse_weight": 1.0})
    config = toy_ntm_config(predictor_hidden=[8], transporter_layers=1, x0_mse_weight=0.25)
    assert ModelConfig.model_validate_json(config.model_dump_json()).build().x0_mse_weight == 0.25
    assert toy_ntm_config().build().x0_mse_weight == 0.0
    finetuned = NTM.from_flow_matching(FlowMatching(mlp("velocity")), x0_mse_weight=2.0)
    assert finetuned.x0_mse_weight == 2.0
