"""Flow matching: the velocity loss, the Euler/Heun/ancestral samplers and ModelConfig.

Initialising an NTM from a flow-matching model is tested in test_finetuning.py."""

from __future__ import annotations

import math

import pytest
import torch
from fm_helpers import (
    F64,
    FM_CONFIG,
    NTM_CONFIG,
    UNUSED_BY_FM,
    D,
    seeded,
    state_shapes,
    velocity_mlp,
    velocity_transformer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import Tensor, nn

from trajflow import NTM, PREDICTORS, FlowMatching, ScheduleConfig
from trajflow.config import ModelConfig
from trajflow.predictors import Predictor
from trajflow.schedules import posterior_coefficients


class GaussianVelocity(Predictor):
    """The exact flow-matching velocity ``E[ε - x_0 | x_t]`` for data ``x_0 ~ N(m, s² I)``.

    With ``V_t = (1-t)² s² + t²``: ``v = -m + (t - (1-t) s²)(x_t - (1-t) m) / V_t``.
    Its ODE maps ``x_1 = z`` to ``x_t = (1-t) m + sqrt(V_t) z``, so ``x_0 = m + s z``.
    """

    def __init__(self, mean: Tensor, std: float):
        super().__init__("velocity", 0, 2)
        self.mean = nn.Parameter(mean.clone())
        self.std = std

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def forward(self, u, t_in, t_out=None, steps=None, y=None, y_mask=None, drop=None):
        t = t_in[..., None].to(u)
        variance = (1 - t) ** 2 * self.std**2 + t**2
        v = -self.mean + (t - (1 - t) * self.std**2) * (u - (1 - t) * self.mean) / variance
        return v, torch.zeros_like(u)


# --------------------------------------------------------------------------- loss
def test_loss_is_the_velocity_mse_of_the_seeded_draws():
    fm = FlowMatching(velocity_mlp())
    x0 = torch.randn(7, D, dtype=F64, generator=seeded(0))
    out = fm.loss(x0, generator=seeded(1))
    generator = seeded(1)
    t = torch.rand(7, generator=generator, dtype=F64)
    noise = torch.randn(7, D, generator=generator, dtype=F64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
    with torch.no_grad():
        v = fm.net(x_t[:, None], t[:, None])[0][:, 0]
    mse = ((v - (noise - x0)) ** 2).mean(1)
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.loss.detach(), mse.mean())
    out.loss.backward()
    for name, parameter in fm.net.named_parameters():
        if not name.startswith(UNUSED_BY_FM):
            assert parameter.grad is not None and parameter.grad.abs().max() > 0, name


@pytest.mark.parametrize("net", ["mlp", "transformer"])
def test_fm_training_never_reaches_the_ntm_only_heads(net):
    """Why NTM.from_flow_matching starts as the FM sampler: FM training leaves the zero-initialised
    (t_out, T) and δ heads at zero, even with weight decay and after they were perturbed."""
    predictor = velocity_mlp() if net == "mlp" else velocity_transformer()
    fm = FlowMatching(predictor)
    event = fm.event_shape
    optimizer = torch.optim.AdamW(fm.parameters(), lr=1e-2, weight_decay=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        fm.loss(torch.randn(8, *event, dtype=F64, generator=seeded(step))).loss.backward()
        optimizer.step()
    for name, parameter in fm.net.named_parameters():
        if name.startswith(UNUSED_BY_FM):
            assert parameter.grad is None or parameter.grad.abs().max() == 0, name
            assert parameter.abs().max() == 0, name


def test_loss_of_the_exact_velocity_is_the_conditional_variance():
    """For Gaussian data the optimum's loss is E Var(ε - x_0 | x_t) per dimension; a shifted
    net does worse."""
    mean, std = torch.tensor([1.0, -0.5], dtype=F64), 0.5
    fm = FlowMatching(GaussianVelocity(mean, std))
    n = 20000
    x0 = mean + std * torch.randn(n, D, dtype=F64, generator=seeded(0))
    out = fm.loss(x0, generator=seeded(1))
    # Var(ε - x_0 | x_t) = 1 + s² - (t - (1-t)s²)² / V_t, averaged over t ~ U(0, 1).
    t = torch.linspace(0, 1, 20001, dtype=F64)
    variance = (1 - t) ** 2 * std**2 + t**2
    expected = (1 + std**2 - (t - (1 - t) * std**2) ** 2 / variance).mean()
    error = out.mse.std() / math.sqrt(n)
    assert abs(out.loss.item() - expected.item()) < 5 * error
    with torch.no_grad():
        fm.net.mean.add_(0.3)
    assert fm.loss(x0, generator=seeded(1)).loss > out.loss + 0.05


def test_conditional_loss_and_shape_errors():
    fm = FlowMatching(velocity_mlp(cond_features=3), cfg_dropout=0.5)
    x0 = torch.randn(8, D, dtype=F64)
    out = fm.loss(x0, torch.randn(8, 3, dtype=F64), generator=seeded(0))
    out.loss.backward()
    assert fm.net.null.grad.abs().max() > 0
    with pytest.raises(ValueError, match=r"FlowMatching.loss expected x0 of shape \(B, 2\)"):
        fm.loss(torch.randn(8, 3, dtype=F64))
    with pytest.raises(ValueError, match="target='velocity'"):
        FlowMatching(PREDICTORS.build("mlp", features=2, target="x0"))


def test_prompt_dropout_drops_a_cfg_dropout_fraction():
    """The network sees drop=True for about cfg_dropout of the rows, not 1 - cfg_dropout."""
    fm = FlowMatching(velocity_mlp(cond_features=3), cfg_dropout=0.1)
    drops = []
    fm.net.register_forward_pre_hook(lambda module, args: drops.append(args[6]))
    n = 4000
    generator = seeded(0)
    x0 = torch.randn(n, D, dtype=F64, generator=generator)
    fm.loss(x0, torch.randn(n, 3, dtype=F64, generator=generator), generator=generator)
    assert len(drops) == 1 and drops[0].dtype == torch.bool and drops[0].shape == (n,)
    fraction = drops[0].double().mean().item()
    assert abs(fraction - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n), fraction  # 5 binomial σ


# --------------------------------------------------------------------------- samplers
class Counter:
    def __init__(self, module: nn.Module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


@settings(max_examples=6, deadline=None)
@given(steps=st.integers(1, 12), method=st.sampled_from(["euler", "heun", "ancestral"]))
def test_samplers_run_at_any_step_count_and_evaluations_are_counted(steps, method):
    fm = FlowMatching(velocity_mlp())
    counter = Counter(fm.net)
    x = fm.sample(3, steps=steps, method=method, generator=seeded(0))
    assert x.shape == (3, D) and bool(torch.isfinite(x).all())
    assert counter.calls == FlowMatching.evaluations(steps, method)
    assert torch.equal(x, fm.sample(3, steps=steps, method=method, generator=seeded(0)))


def test_evaluations_formula():
    assert FlowMatching.evaluations(10, "euler") == 10
    assert FlowMatching.evaluations(10, "ancestral") == 10
    assert FlowMatching.evaluations(10, "heun") == 19
    assert FlowMatching.evaluations(1, "heun") == 1


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="'euler', 'heun' or 'ancestral'"):
        FlowMatching(velocity_mlp()).sample(2, steps=2, method="rk4")


@pytest.mark.parametrize(
    ("method", "steps", "tolerance"), [("euler", 200, 2e-2), ("heun", 40, 5e-3)]
)
def test_ode_samplers_with_the_exact_velocity_reproduce_gaussian_data(method, steps, tolerance):
    mean, std, n = torch.tensor([1.0, -2.0], dtype=F64), 0.3, 4000
    fm = FlowMatching(GaussianVelocity(mean, std))
    x = fm.sample(n, steps=steps, method=method, generator=seeded(0))
    # Pathwise: the exact flow sends the starting noise z to m + s z.
    z = torch.randn(n, D, generator=seeded(0), dtype=F64)
    assert (x - (mean + std * z)).abs().max() < tolerance
    # Distribution: mean and std within Monte Carlo error (plus the discretisation error).
    mean_error, std_error = std / math.sqrt(n), std / math.sqrt(2 * n)
    assert ((x.mean(0) - mean).abs() < 4 * mean_error + tolerance).all(), x.mean(0)
    assert ((x.std(0) - std).abs() < 4 * std_error + tolerance).all(), x.std(0)


def test_euler_is_first_order_and_heun_second_order():
    mean, std = torch.tensor([1.0, -2.0], dtype=F64), 0.3
    fm = FlowMatching(GaussianVelocity(mean, std))
    target = mean + std * torch.randn(200, D, generator=seeded(0), dtype=F64)

    def error(method: str, steps: int) -> float:
        x = fm.sample(200, steps=steps, method=method, generator=seeded(0))
        return (x - target).abs().max().item()

    euler = error("euler", 20) / error("euler", 40)
    heun = error("heun", 20) / error("heun", 40)
    assert 1.6 < euler < 2.4, euler
    assert 3.2 < heun < 4.8, heun
    assert error("heun", 10) < 0.5 * error("euler", 10)


def test_ancestral_sampler_by_hand():
    fm = FlowMatching(velocity_mlp(), ScheduleConfig(grid="shifted", shift=0.5, t_min_eval=0.01))
    n, steps = 3, 3
    x = fm.sample(n, steps=steps, method="ancestral", generator=seeded(2))
    generator = seeded(2)
    noises = [torch.randn(n, D, generator=generator, dtype=F64) for _ in range(steps + 1)]
    times = fm.schedule.build()(steps, torch.full((n,), 0.01, dtype=F64))
    level = noises[0]
    for k in range(steps - 1, -1, -1):
        s, t = times[:, k : k + 1], times[:, k + 1 : k + 2]
        with torch.no_grad():
            v = fm.net(level[:, None], t)[0][:, 0]
        x0_hat = level - t * v
        a = s**2 * (1 - t) / (t**2 * (1 - s))
        b = (t - s) * (t + s - 2 * t * s) / (t**2 * (1 - s))
        c = s * ((t - s) * (t + s - 2 * t * s)).sqrt() / (t * (1 - s))
        level = a * level + b * x0_hat + c * noises[steps - k]
    torch.testing.assert_close(x, level, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- ModelConfig
@pytest.mark.parametrize("raw", [NTM_CONFIG, FM_CONFIG], ids=["ntm", "flow_matching"])
def test_model_config_round_trips_json_and_builds(raw):
    config = ModelConfig.model_validate(raw)
    again = ModelConfig.model_validate_json(config.model_dump_json())
    assert again == config
    model, rebuilt = config.build(), again.build()
    assert type(model) is (NTM if raw["kind"] == "ntm" else FlowMatching)
    assert state_shapes(model) == state_shapes(rebuilt)
    rebuilt.load_state_dict(model.state_dict())
    assert model.schedule == config.schedule
    if raw["kind"] == "ntm":
        assert model.mode == "pairwise" and model.cfg_dropout == 0.2
        assert len(model.transporter) == 2 and model.transporter.conditional
        assert model.loss(torch.randn(4, 2)).nll.shape == (4,)
    else:
        assert model.sample(3, steps=2).shape == (3, 2)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "stepwise"}, "mode"),
        ({"cfg_dropout": 1.0}, "cfg_dropout"),
        ({"kind": "gan"}, "kind"),
        ({"schedule": {"steps": [0]}}, "steps"),
        ({"extra": 1}, "extra"),
    ],
)
def test_model_config_validation_names_the_field(change, field):
    with pytest.raises(ValidationError, match=field):
        ModelConfig.model_validate({**NTM_CONFIG, **change})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"predictor": {"name": "unet"}}, "predictor"),
        ({"transporter": [{"name": "glow"}]}, "transporter"),
    ],
)
def test_model_config_unknown_names_are_validation_errors(change, field):
    with pytest.raises(ValidationError, match=field):
        ModelConfig.model_validate({**NTM_CONFIG, **change})


def test_model_config_flow_matching_needs_a_velocity_predictor():
    config = ModelConfig.model_validate({**FM_CONFIG, "predictor": NTM_CONFIG["predictor"]})
    with pytest.raises(ValueError, match="target='velocity'"):
        config.build()


def test_posterior_noise_of_ancestral_sampler_is_c():
    """Sanity of the pieces used above: C at t = 1 is s (NTM_METHOD §2)."""
    c2 = posterior_coefficients(torch.tensor(0.3, dtype=F64), torch.tensor(1.0, dtype=F64)).c2
    assert c2.sqrt().item() == pytest.approx(0.3)
