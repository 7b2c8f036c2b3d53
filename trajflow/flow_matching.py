"""Flow matching: the baseline, and the pretraining model an NTM can be initialised from.

``x_t = (1 - t) x_0 + t ε`` and the network regresses the velocity ``v = ε - x_0``.
Samplers integrate ``dx/dt = v`` from ``t = 1`` to ``t = 0`` with Euler or Heun steps, or run
the Gaussian *ancestral* chain ``x_s ~ N(μ_post(x_t, v), C²)`` on the NTM grid — the sampler
that :meth:`trajflow.ntm.NTM.from_flow_matching` starts from.

Example:
    >>> import torch
    >>> from trajflow import FlowMatching, PREDICTORS
    >>> net = PREDICTORS.build("mlp", features=2, hidden_features=[32], target="velocity")
    >>> fm = FlowMatching(net)
    >>> fm.loss(torch.randn(16, 2)).loss.dim()
    0
    >>> fm.sample(4, steps=8, method="heun", generator=torch.Generator().manual_seed(0)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from trajflow.checks import (
    check_count,
    check_data,
    check_finite,
    check_first_level,
    check_number,
)
from trajflow.predictors import Predictor
from trajflow.schedules import (
    ScheduleConfig,
    _expand,
    posterior_coefficients,
    posterior_mean_from_velocity,
)

__all__ = ["FlowMatching", "FlowMatchingLoss"]

Method = Literal["euler", "heun", "ancestral"]


@dataclasses.dataclass
class FlowMatchingLoss:
    """What :meth:`FlowMatching.loss` returns: the scalar loss and the per-sample MSE ``(B,)``."""

    loss: Tensor
    mse: Tensor


class FlowMatching(nn.Module):
    """A flow-matching velocity model on any predictor backbone (``target="velocity"``).

    Args:
        net: The velocity network; called with a single level ``(B, 1, *event)`` and no
            ``t_out``/``T``, so its zero-initialised ``(t_out, T)`` path stays unused.
        schedule: The NTM schedule used by the ancestral sampler (grid and ``t_min_eval``).
        cfg_dropout: Probability of dropping the condition in training.
    """

    def __init__(
        self, net: Predictor, schedule: ScheduleConfig | None = None, cfg_dropout: float = 0.1
    ):
        super().__init__()
        if not isinstance(net, Predictor):
            raise TypeError(
                f"FlowMatching expected net to be a Predictor (see PREDICTORS), "
                f"got {type(net).__name__}"
            )
        if schedule is not None and not isinstance(schedule, ScheduleConfig):
            raise TypeError(
                f"FlowMatching expected schedule to be a ScheduleConfig, "
                f"got {type(schedule).__name__}"
            )
        check_number("FlowMatching", "cfg_dropout", cfg_dropout, 0.0, 1.0, open_high=True)
        if net.target != "velocity":
            raise ValueError("FlowMatching needs a predictor built with target='velocity'")
        self.net = net
        self.schedule = schedule or ScheduleConfig()
        self.grid = self.schedule.build()
        self.cfg_dropout = cfg_dropout
        self.event_shape = tuple(net.event_shape)

    def velocity(self, x: Tensor, t: Tensor, y=None, y_mask=None, drop=None) -> Tensor:
        """``v(x_t, t)`` for ``x`` ``(B, *event)`` and ``t`` ``(B,)``."""
        return self.net(x[:, None], t.to(x.dtype)[:, None], None, None, y, y_mask, drop)[0][:, 0]

    def loss(
        self,
        x0: Tensor,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
    ) -> FlowMatchingLoss:
        """Velocity regression at ``t ~ U(0, 1)``: mean over samples of ``‖v - (ε - x_0)‖² / D``.

        Raises:
            TypeError, ValueError: For data that is not a finite, non-empty floating batch
                ``(B, *event)`` of the model's dtype, or a non-finite condition.
        """
        check_data("FlowMatching.loss", "x0", x0, self.event_shape, self._device_dtype()[1])
        if isinstance(y, Tensor):
            check_finite("FlowMatching.loss", "y", y)
        check_count("FlowMatching.loss", "step", step, minimum=0)
        batch = x0.shape[0]
        t = torch.rand(batch, generator=generator, dtype=x0.dtype).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = (1 - _expand(t, x0)) * x0 + _expand(t, x0) * noise
        drop = None
        if y is not None and self.cfg_dropout > 0:
            drop = (torch.rand(batch, generator=generator) < self.cfg_dropout).to(x0.device)
        error = self.velocity(x_t, t, y, y_mask, drop) - (noise - x0)
        mse = error.square().flatten(1).mean(1)
        return FlowMatchingLoss(mse.mean(), mse.detach())

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int = 100,
        method: Method = "euler",
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        t_min: float | None = None,
    ) -> Tensor:
        """Draws ``n`` samples with ``steps`` network-evaluation steps.

        Args:
            n: Number of samples.
            steps: Integration steps (``"ancestral"``: Gaussian steps ``T``).
            method: ``"euler"`` and ``"heun"`` integrate the ODE on a uniform grid from 1 to 0
                (Heun uses two evaluations per step but the last); ``"ancestral"`` runs the
                Gaussian chain on the schedule's grid down to ``t_min``, drawing noise in the
                same order as :meth:`trajflow.ntm.NTM.sample`.
            y: Condition of every sample, for a conditional network.
            y_mask: Its token mask.
            generator: Seeds the noise.
            t_min: Last level of the ancestral chain (default: the schedule's ``t_min_eval``).

        Raises:
            TypeError, ValueError: For ``n`` or ``steps`` not an integer ``>= 1``, an unknown
                method, ``t_min`` outside ``(0, 1)`` or a non-finite ``y``.
        """
        owner = "FlowMatching.sample"
        n = check_count(owner, "n", n)
        steps = check_count(owner, "steps", steps)
        if method not in ("euler", "heun", "ancestral"):
            raise ValueError(
                f"{owner} expected method 'euler', 'heun' or 'ancestral', got {method!r}"
            )
        if method == "ancestral":
            t_min = self.schedule.t_min_eval if t_min is None else t_min
            t_min = check_first_level(owner, "t_min", t_min, self.grid, steps)
        elif t_min is not None:
            t_min = check_number(owner, "t_min", t_min, 0.0, 1.0, open_low=True, open_high=True)
        if isinstance(y, Tensor):
            check_finite(owner, "y", y)
        device, dtype = self._device_dtype()

        def noise() -> Tensor:
            return torch.randn((n, *self.event_shape), generator=generator, dtype=dtype).to(device)

        x = noise()
        if method == "ancestral":
            times = self.grid(steps, torch.full((n,), t_min, dtype=torch.float64)).to(device)
            for k in range(steps - 1, -1, -1):
                s, t = times[:, k], times[:, k + 1]
                mean = posterior_mean_from_velocity(x, self.velocity(x, t, y, y_mask), s, t)
                std = _expand(posterior_coefficients(s, t).c2.sqrt(), x)
                x = mean + std * noise()
            return x
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        for t, s in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            t_batch = torch.full((n,), t, dtype=dtype, device=device)
            v = self.velocity(x, t_batch, y, y_mask)
            if method == "heun" and s > 0:
                x_euler = x + (s - t) * v
                v = 0.5 * (v + self.velocity(x_euler, torch.full_like(t_batch, s), y, y_mask))
            x = x + (s - t) * v
        return x

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the network lives and its floating dtype (CPU float32 without parameters)."""
        for parameter in self.net.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    @staticmethod
    def evaluations(steps: int, method: Method) -> int:
        """Network evaluations a sampler makes for ``steps`` steps."""
        return 2 * steps - 1 if method == "heun" else steps
