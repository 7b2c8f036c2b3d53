"""Flow matching: the velocity loss, the Euler/Heun/ancestral samplers, initialising an NTM
from a flow-matching model (NTM_METHOD §6), the auxiliary alignment loss and ModelConfig."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import Tensor, nn

from trajflow import BLOCKS, NTM, PREDICTORS, FlowMatching, ScheduleConfig, Sequential
from trajflow.config import ModelConfig
from trajflow.predictors import Predictor
from trajflow.schedules import posterior_coefficients
from trajflow.testing import perturb_parameters

F64 = torch.float64
D = 2


#: Parts of a predictor that flow-matching training never reaches (no t_out, T or δ in FM).
UNUSED_BY_FM = ("target_time.", "delta_head.")


def as_if_fm_trained(net: Predictor, seed: int) -> Predictor:
    """Perturbs what FM training moves; the (t_out, T) and δ heads keep their zero init
    (test_fm_training_never_reaches_the_ntm_only_heads checks they get no gradient)."""
    perturb_parameters(net, scale=0.2, seed=seed)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith(UNUSED_BY_FM):
                parameter.zero_()
    return net


def velocity_mlp(seed: int = 0, cond_features: int = 0) -> Predictor:
    torch.manual_seed(seed)
    net = PREDICTORS.build(
        "mlp",
        features=D,
        hidden_features=[16, 16],
        time_features=8,
        target="velocity",
        cond_features=cond_features,
    ).double()
    return as_if_fm_trained(net, seed)


def velocity_transformer(seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    net = PREDICTORS.build(
        "trajectory_transformer",
        features=2,
        tokens=3,
        dim=16,
        layers=1,
        heads=2,
        time_features=8,
        target="velocity",
    ).double()
    return as_if_fm_trained(net, seed)


def identity_transporter(features: int = D) -> Sequential:
    """Identity-initialised, time-conditioned couplings (zero output layers)."""
    return Sequential(
        BLOCKS.build("affine_coupling", features=features, hidden_features=[8], time_features=8),
        BLOCKS.build(
            "affine_coupling", features=features, hidden_features=[8], time_features=8, parity=True
        ),
    ).double()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


# --------------------------------------------------------------------------- NTM from FM
@pytest.mark.parametrize("net", ["mlp", "transformer"])
@pytest.mark.parametrize("steps", [1, 4])
def test_ntm_from_flow_matching_is_the_ancestral_sampler(net, steps):
    """Paper §3.3: at initialisation the NTM samples exactly like the FM ancestral chain."""
    if net == "mlp":
        fm, transporter = FlowMatching(velocity_mlp(seed=3)), identity_transporter()
    else:
        fm = FlowMatching(velocity_transformer(seed=3))
        transporter = Sequential(
            BLOCKS.build(
                "tarflow", features=2, tokens=3, dim=16, layers=1, heads=2, time_features=8
            )
        ).double()
    ntm = NTM.from_flow_matching(fm, transporter=transporter)
    x_ntm = ntm.sample(5, steps=steps, generator=seeded(4))
    x_fm = fm.sample(5, steps=steps, method="ancestral", generator=seeded(4))
    torch.testing.assert_close(x_ntm, x_fm, rtol=1e-10, atol=1e-10)
    # Not trivially equal: the FM network matters, and the predictor is a copy of it.
    other = FlowMatching(velocity_mlp(seed=5) if net == "mlp" else velocity_transformer(seed=5))
    assert not torch.allclose(
        x_fm, other.sample(5, steps=steps, method="ancestral", generator=seeded(4))
    )
    assert ntm.predictor is not fm.net and ntm.teacher is not fm.net
    for p, q in zip(ntm.predictor.parameters(), fm.net.parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr() and torch.equal(p, q)


def test_ntm_from_flow_matching_inherits_the_fm_schedule():
    schedule = ScheduleConfig(grid="shifted", shift=0.8, t_min_eval=0.01)
    fm = FlowMatching(velocity_mlp(seed=3), schedule)
    ntm = NTM.from_flow_matching(fm, transporter=identity_transporter())
    torch.testing.assert_close(
        ntm.sample(5, steps=3, generator=seeded(4)),
        fm.sample(5, steps=3, method="ancestral", generator=seeded(4)),
    )


def test_ntm_from_flow_matching_with_explicit_schedule_matches():
    schedule = ScheduleConfig(grid="shifted", shift=0.8, t_min_eval=0.01)
    fm = FlowMatching(velocity_mlp(seed=3), schedule)
    ntm = NTM.from_flow_matching(fm, transporter=identity_transporter(), schedule=schedule)
    torch.testing.assert_close(
        ntm.sample(5, steps=3, generator=seeded(4)),
        fm.sample(5, steps=3, method="ancestral", generator=seeded(4)),
        rtol=1e-10,
        atol=1e-10,
    )


def test_from_flow_matching_needs_a_velocity_network():
    fm = FlowMatching(velocity_mlp())
    fm.net.target = "x0"
    with pytest.raises(ValueError, match="target='velocity'"):
        NTM.from_flow_matching(fm)


def test_no_delta_mean_trains_only_delta_and_transporter():
    fm = FlowMatching(velocity_mlp())
    ntm = NTM.from_flow_matching(fm, transporter=identity_transporter(), no_delta_mean=True)
    trainable = {name for name, p in ntm.predictor.named_parameters() if p.requires_grad}
    assert trainable == {"delta_head.weight", "delta_head.bias"}
    assert all(p.requires_grad for p in ntm.transporter.parameters())
    assert not any(p.requires_grad for p in ntm.teacher.parameters())
    # One optimiser step: δ moves, the mean head (hence μ_P = μ_post) does not.
    u = torch.randn(4, 3, D, dtype=F64, generator=seeded(0))
    t_in = torch.tensor([[0.25, 0.5, 0.75]], dtype=F64).expand(4, -1)
    before = [v.detach().clone() for v in ntm.predictor(u, t_in, 0.5 * t_in, torch.full((4,), 4))]
    optimizer = torch.optim.SGD([p for p in ntm.parameters() if p.requires_grad], lr=0.1)
    ntm.loss(torch.randn(32, D, dtype=F64), generator=seeded(1)).loss.backward()
    optimizer.step()
    after = ntm.predictor(u, t_in, 0.5 * t_in, torch.full((4,), 4))
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert not torch.allclose(after[1], before[1])


def test_aux_weight_schedule_is_a_cosine_from_2_5_to_0():
    ntm = NTM.from_flow_matching(FlowMatching(velocity_mlp()), aux_steps=100)
    assert ntm.aux_weight_at(0) == pytest.approx(2.5)
    assert ntm.aux_weight_at(50) == pytest.approx(1.25)
    assert ntm.aux_weight_at(25) == pytest.approx(2.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert ntm.aux_weight_at(100) == pytest.approx(0.0, abs=1e-12)
    assert ntm.aux_weight_at(1000) == pytest.approx(0.0, abs=1e-12)
    weights = [ntm.aux_weight_at(step) for step in range(0, 101, 5)]
    assert all(a > b for a, b in itertools.pairwise(weights))
    custom = NTM.from_flow_matching(FlowMatching(velocity_mlp()), aux_weight=1.0, aux_steps=0)
    assert custom.aux_weight_at(0) == custom.aux_weight_at(10**6) == 1.0


def test_aux_loss_is_zero_at_init_and_positive_after_perturbing_the_mean_head():
    fm = FlowMatching(velocity_mlp())
    ntm = NTM.from_flow_matching(fm, transporter=identity_transporter(), aux_steps=100)
    x0 = torch.randn(16, D, dtype=F64, generator=seeded(0))
    out = ntm.loss(x0, step=0, generator=seeded(1))
    assert out.aux is not None and out.aux.item() < 1e-20
    with torch.no_grad():
        ntm.predictor.mean_head.bias.add_(0.5)
    out = ntm.loss(x0, step=30, generator=seeded(1))
    assert out.aux.item() > 1e-3
    # The loss is the per-dimension NLL plus λ(step) times the alignment term.
    torch.testing.assert_close(
        out.loss, out.nll.mean() / D + ntm.aux_weight_at(30) * out.aux, rtol=1e-12, atol=1e-12
    )
    out.loss.backward()
    assert ntm.predictor.mean_head.bias.grad.abs().max() > 0
    assert all(p.grad is None for p in ntm.teacher.parameters())
    # No aux term when its weight is 0 or without a teacher.
    assert NTM.from_flow_matching(fm, aux_weight=0.0).loss(x0).aux is None


def test_delta_learns_the_step_with_no_delta_mean_and_the_transformer():
    """Issue 6, item 4: with only the δ head trainable, δ must still come to depend on
    (t_out, T); the transformer's δ head therefore reads the time embeddings."""
    fm = FlowMatching(velocity_transformer(seed=2), ScheduleConfig(steps=[2, 4]))
    ntm = NTM.from_flow_matching(fm, no_delta_mean=True)
    trainable = [p for p in ntm.parameters() if p.requires_grad]
    assert {n for n, p in ntm.named_parameters() if p.requires_grad} == {
        "predictor.delta_head.weight",
        "predictor.delta_head.bias",
    }
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for step in range(2):
        optimizer.zero_grad()
        ntm.loss(torch.randn(16, 3, 2, dtype=F64, generator=seeded(step))).loss.backward()
        optimizer.step()
    u = torch.randn(4, 2, 3, 2, dtype=F64, generator=seeded(9))
    t_in = torch.tensor([[0.3, 0.6]], dtype=F64).expand(4, -1)
    delta = ntm.predictor(u, t_in, 0.5 * t_in, torch.full((4,), 2))[1]
    for t_out, steps in ((0.2 * t_in, 2), (0.5 * t_in, 4)):
        other = ntm.predictor(u, t_in, t_out, torch.full((4,), steps))[1]
        assert (other - delta).abs().max() > 1e-4


# --------------------------------------------------------------------------- the FM teacher
FINETUNE_TRANSPORTER = [
    {
        "name": "affine_coupling",
        "kwargs": {"features": D, "hidden_features": [8], "time_features": 8},
    }
]


def finetuned(no_delta_mean: bool = False) -> tuple[NTM, ModelConfig]:
    """An NTM finetuned from a (perturbed) FM model and the config it reloads from (float32,
    as a config builds it)."""
    fm_config = ModelConfig.model_validate(FM_CONFIG)
    torch.manual_seed(0)
    fm = fm_config.build()
    as_if_fm_trained(fm.net, seed=0)
    transporter = Sequential.from_specs(FINETUNE_TRANSPORTER)
    ntm = NTM.from_flow_matching(fm, transporter, no_delta_mean=no_delta_mean, aux_steps=10)
    config = ModelConfig.finetuned_from(
        fm_config, FINETUNE_TRANSPORTER, no_delta_mean=no_delta_mean, aux_steps=10
    )
    return ntm, config


def test_the_teacher_is_not_part_of_the_model_state():
    """Issue 6, item 5: not in state_dict or parameters (checkpoints, optimizer, EMA)."""
    ntm, _ = finetuned()
    assert ntm.teacher is not None
    assert not any(key.startswith("teacher") for key in ntm.state_dict())
    assert "teacher" not in dict(ntm.named_children())
    teacher_ids = {id(p) for p in ntm.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in ntm.parameters()}
    assert not teacher_ids & {id(b) for b in ntm.buffers()}


@pytest.mark.parametrize("no_delta_mean", [False, True])
def test_finetuning_from_a_frozen_ema_copy_trains_the_predictor(no_delta_mean):
    """An EMA copy has requires_grad off; the NTM built from it must still learn (the toy
    benchmark's finetuned row once trained only its transporter this way)."""
    fm = FlowMatching(velocity_mlp()).requires_grad_(False)
    ntm = NTM.from_flow_matching(fm, identity_transporter(), no_delta_mean=no_delta_mean)
    trainable = {name for name, p in ntm.predictor.named_parameters() if p.requires_grad}
    everything = {name for name, _ in ntm.predictor.named_parameters()}
    assert trainable == ({"delta_head.weight", "delta_head.bias"} if no_delta_mean else everything)
    assert not any(p.requires_grad for p in ntm.teacher.parameters())
    assert not any(p.requires_grad for p in fm.parameters())  # the source model is untouched


def test_the_teacher_stays_frozen_in_eval_mode_and_follows_the_model():
    ntm, _ = finetuned()
    ntm.train()
    assert ntm.training and ntm.predictor.training
    assert not ntm.teacher.training
    assert not any(p.requires_grad for p in ntm.teacher.parameters())
    ntm.double()
    assert {p.dtype for p in ntm.teacher.parameters()} == {F64}
    out = ntm.loss(torch.randn(8, D, dtype=F64), generator=seeded(0))  # both in float64
    assert out.aux is not None and bool(torch.isfinite(out.loss))
    with pytest.raises(TypeError, match="Predictor teacher"):
        ntm.teacher = nn.Linear(2, 2)


def test_a_copy_shares_the_teacher_and_the_ema_holds_none_of_it():
    """train() makes its EMA with copy.deepcopy and averages parameters and buffers in zip."""
    from trajflow.train import TrainConfig, train

    ntm, config = finetuned()
    clone = copy.deepcopy(ntm)
    assert clone.teacher is ntm.teacher
    assert clone.predictor is not ntm.predictor
    assert state_shapes(clone) == state_shapes(ntm)
    result = train(
        ntm,
        TrainConfig(iterations=3, batch_size=16, warmup_steps=1, ema_decay=0.5),
        model_config=config,
        progress=False,
    )
    assert result.ema.teacher is ntm.teacher
    assert sorted(result.ema.state_dict()) == sorted(ntm.state_dict())
    assert not ntm.teacher.training


@pytest.mark.parametrize("no_delta_mean", [False, True])
def test_a_finetuned_checkpoint_reloads_without_the_teacher(tmp_path, no_delta_mean):
    from trajflow.checkpoint import load_checkpoint, save_checkpoint

    ntm, config = finetuned(no_delta_mean)
    with torch.no_grad():
        ntm.predictor.delta_head.bias.add_(0.1)  # something a finetuning step would move
    save_checkpoint(tmp_path / "ckpt", ntm, config, ema=copy.deepcopy(ntm), step=4)
    loaded, state = load_checkpoint(tmp_path / "ckpt")
    assert (
        state.model_config == config and state.model_config.finetune.no_delta_mean is no_delta_mean
    )
    assert isinstance(loaded, NTM) and loaded.teacher is None
    assert loaded.no_delta_mean is no_delta_mean and loaded.predictor.target == "velocity"
    for (name, a), (other, b) in zip(
        ntm.named_parameters(), loaded.named_parameters(), strict=True
    ):
        assert name == other and torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    x0 = torch.randn(8, D, generator=seeded(0))
    original, reloaded = ntm.loss(x0, generator=seeded(1)), loaded.loss(x0, generator=seeded(1))
    assert original.aux is not None and reloaded.aux is None  # no teacher, no auxiliary loss
    torch.testing.assert_close(reloaded.nll, original.nll)
    # To resume *with* the auxiliary loss, load the weights into a from_flow_matching model.
    again, _ = finetuned(no_delta_mean)
    load_checkpoint(tmp_path / "ckpt", model=again)
    assert again.teacher is not None
    torch.testing.assert_close(again.loss(x0, generator=seeded(1)).loss, original.loss)


def test_finetuned_from_needs_a_flow_matching_config_and_a_velocity_predictor():
    with pytest.raises(ValueError, match="kind='flow_matching' config"):
        ModelConfig.finetuned_from(ModelConfig.model_validate(NTM_CONFIG))
    config = ModelConfig.model_validate({**NTM_CONFIG, "finetune": {"no_delta_mean": True}})
    with pytest.raises(ValueError, match="velocity predictor"):
        config.build()
    with pytest.raises(ValidationError, match="finetune is an NTM setting"):
        ModelConfig.model_validate({**FM_CONFIG, "finetune": {}})
    with pytest.raises(ValidationError, match="aux_weight"):
        ModelConfig.model_validate({**NTM_CONFIG, "finetune": {"aux_weight": -1}})


# --------------------------------------------------------------------------- ModelConfig
NTM_CONFIG = {
    "kind": "ntm",
    "predictor": {"name": "mlp", "kwargs": {"features": 2, "hidden_features": [8]}},
    "transporter": [
        {"name": "affine_coupling", "kwargs": {"features": 2, "time_features": 8}},
        {"name": "reverse"},
    ],
    "schedule": {"grid": "shifted", "shift": 0.3, "steps": [2, 4]},
    "mode": "pairwise",
    "cfg_dropout": 0.2,
}
FM_CONFIG = {
    "kind": "flow_matching",
    "predictor": {
        "name": "mlp",
        "kwargs": {"features": 2, "hidden_features": [8], "target": "velocity"},
    },
    "schedule": {"t_min_eval": 0.01},
}


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


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
