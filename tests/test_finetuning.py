"""Finetuning an NTM from flow matching (NTM_METHOD §6): the ancestral sampler at
initialisation, the auxiliary alignment loss, the frozen teacher and finetuned checkpoints."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from fm_helpers import (
    F64,
    FM_CONFIG,
    NTM_CONFIG,
    D,
    as_if_fm_trained,
    identity_transporter,
    seeded,
    state_shapes,
    velocity_mlp,
    velocity_transformer,
)
from pydantic import ValidationError
from torch import nn

from trajflow import BLOCKS, NTM, FlowMatching, ScheduleConfig, Sequential
from trajflow.config import ModelConfig


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
