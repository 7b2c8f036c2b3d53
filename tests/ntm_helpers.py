"""Models, trajectories and a hand-coded likelihood shared by the NTM tests.

References are coded here independently of ``NTM.gaussian``: the posterior coefficients are
written out and the Gaussians are ``torch.distributions.Normal`` (NTM_METHOD §2–§5).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Normal

from trajflow import BLOCKS, NTM, PREDICTORS, Context, Sequential
from trajflow.predictors import Predictor
from trajflow.schedules import UniformGrid, sample_trajectory
from trajflow.testing import perturb_parameters

F64 = torch.float64
D = 3


#: The MLP predictor of these tests, less its width ``features``.
TINY_MLP = {"hidden_features": [16, 16], "time_features": 8}


def mlp(target: str = "x0", cond_features: int = 0, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    net = PREDICTORS.build(
        "mlp", features=D, **TINY_MLP, target=target, cond_features=cond_features
    )
    return perturb_parameters(net.double(), scale=0.2, seed=seed)


#: A trajectory transformer small enough for float64 reference checks (3 tokens of 2).
TINY_TRANSFORMER = {"features": 2, "tokens": 3, "dim": 16, "layers": 1, "heads": 2,
                    "time_features": 8}  # fmt: skip


def transformer(level_attention: str, target: str = "x0", seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    net = PREDICTORS.build(
        "trajectory_transformer",
        **TINY_TRANSFORMER,
        level_attention=level_attention,
        target=target,
    )
    return perturb_parameters(net.double(), scale=0.2, seed=seed)


def coupling_transporter(seed: int = 1, perturb: bool = True) -> Sequential:
    """Two time-conditioned affine couplings around a permutation (vectors of width D)."""
    torch.manual_seed(seed)
    flow = Sequential(
        BLOCKS.build("affine_coupling", features=D, hidden_features=[16], time_features=8),
        BLOCKS.build("reverse"),
        BLOCKS.build(
            "affine_coupling", features=D, hidden_features=[16], time_features=8, parity=True
        ),
    ).double()
    return perturb_parameters(flow, scale=0.3, seed=seed) if perturb else flow


def tarflow_transporter(seed: int = 1) -> Sequential:
    torch.manual_seed(seed)
    flow = Sequential(
        BLOCKS.build("tarflow", features=2, tokens=3, dim=16, layers=1, heads=2, time_features=8),
        BLOCKS.build(
            "tarflow", features=2, tokens=3, dim=16, layers=1, heads=2, time_features=8, flip=True
        ),
    ).double()
    return perturb_parameters(flow, scale=0.1, seed=seed)


def draw(event: tuple[int, ...], steps: int = 3, batch: int = 4, seed: int = 0):
    """A batch of forward trajectories with per-sample t_min: ``(trajectory, times)``."""
    generator = torch.Generator().manual_seed(seed)
    x0 = 0.5 + torch.randn(batch, *event, generator=generator, dtype=F64)
    t_min = 0.002 + 0.04 * torch.rand(batch, generator=generator, dtype=F64)
    times = UniformGrid()(steps, t_min)
    return sample_trajectory(x0, times, generator), times


def coefficients(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior ``N(A x_t + B x_0, C²)`` written out (NTM_METHOD §2)."""
    a = s**2 * (1 - t) / (t**2 * (1 - s))
    b = (t - s) * (t + s - 2 * t * s) / (t**2 * (1 - s))
    c = (s**2 * (t - s) * (t + s - 2 * t * s)).sqrt() / (t * (1 - s))
    return a, b, c


def per_level_log_probs(model: NTM, trajectory: Tensor, times: Tensor, transporter=None):
    """``(top, terms)``: ``log N(x_1; 0, I)`` and ``log N(u_k; μ_k, σ_k) + logdet_k`` per level,
    from the predictor's raw outputs, the written-out coefficients and Normal densities."""
    batch, levels = times.shape
    steps = levels - 1
    event_dims = trajectory.dim() - 2
    us, logdets = [], []
    for k in range(steps):
        if transporter is None:
            us.append(trajectory[:, k])
            logdets.append(torch.zeros(batch, dtype=F64))
        else:
            ctx = Context(t=times[:, k], steps=torch.full((batch,), steps))
            u, logdet = transporter(trajectory[:, k], ctx)
            us.append(u)
            logdets.append(logdet)
    u = torch.stack(us, dim=1)
    u_in = torch.cat([u[:, 1:], trajectory[:, -1:]], dim=1)  # the top level is not transported
    head, delta = model.predictor(u_in, times[:, 1:], times[:, :-1], torch.full((batch,), steps))
    shape = (batch, steps) + (1,) * event_dims
    s, t = times[:, :-1].reshape(shape), times[:, 1:].reshape(shape)
    a, b, c = coefficients(s, t)
    clean = head if model.predictor.target == "x0" else u_in - t * head
    normal = Normal(a * u_in + b * clean, c * torch.exp(delta))
    terms = normal.log_prob(u).flatten(2).sum(-1) + torch.stack(logdets, dim=1)
    top = Normal(0.0, 1.0).log_prob(trajectory[:, -1]).flatten(1).sum(-1)
    return top, terms
