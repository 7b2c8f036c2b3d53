"""Trajectory schedules: time grids and the flow-matching Gaussian forward process.

Flow-matching marginals ``q(x_t | x_0) = N((1 - t) x_0, t² I)``, ``t ∈ [0, 1]``, realised as a
Markov chain with kernel ``q(x_t | x_s) = N(α x_s, σ² I)``, ``α = (1-t)/(1-s)``,
``σ² = t² - α² s²`` (``s < t``). A trajectory of ``T`` coarse steps lives on a grid
``t_min = t_0 < t_1 < … < t_T = 1``.

Example:
    >>> import torch
    >>> grid = SCHEDULES.build("shifted", shift=0.5)
    >>> times = grid(steps=4, t_min=torch.tensor([1e-3, 2e-2]))
    >>> times.shape, times[:, -1].tolist()
    (torch.Size([2, 5]), [1.0, 1.0])
    >>> trajectory = sample_trajectory(torch.zeros(2, 3), times)
    >>> trajectory.shape  # (B, T + 1, *event)
    torch.Size([2, 5, 3])
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from trajflow.registry import Registry

__all__ = [
    "SCHEDULES",
    "PosteriorCoefficients",
    "ScheduleConfig",
    "ShiftedGrid",
    "StepsWeighting",
    "TimeGrid",
    "UniformGrid",
    "draw_steps",
    "draw_t_min",
    "forward_kernel",
    "paper_shift",
    "posterior_coefficients",
    "posterior_mean_from_velocity",
    "sample_trajectory",
    "trajectory_covariance",
]


def _expand(value: Tensor, like: Tensor) -> Tensor:
    """Reshapes per-sample scalars ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return value.reshape(value.shape + (1,) * (like.dim() - value.dim())).to(like.dtype)


def forward_kernel(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients of ``q(x_t | x_s) = N(α x_s, σ² I)`` for ``s < t``.

    Returns:
        ``(α, σ²)`` with ``α = (1-t)/(1-s)`` and ``σ² = (t-s)(t+s-2ts)/(1-s)²``.
    """
    alpha = (1 - t) / (1 - s)
    variance = (t - s) * (t + s - 2 * t * s) / (1 - s) ** 2
    return alpha, variance


class PosteriorCoefficients(NamedTuple):
    """``q(x_s | x_t, x_0) = N(A x_t + B x_0, C² I)``."""

    a: Tensor
    b: Tensor
    c2: Tensor


def posterior_coefficients(s: Tensor, t: Tensor) -> PosteriorCoefficients:
    """Posterior of one coarse step given the clean point, for ``0 ≤ s < t ≤ 1``.

    ``A = s²(1-t) / (t²(1-s))``, ``B = (t-s)(t+s-2ts) / (t²(1-s))``,
    ``C² = s²(t-s)(t+s-2ts) / (t²(1-s)²)``. At ``t = 1``: ``A = 0, B = 1-s, C = s``.
    """
    gap = (t - s) * (t + s - 2 * t * s)
    return PosteriorCoefficients(
        a=s**2 * (1 - t) / (t**2 * (1 - s)),
        b=gap / (t**2 * (1 - s)),
        c2=s**2 * gap / (t**2 * (1 - s) ** 2),
    )


def posterior_mean_from_velocity(x_t: Tensor, velocity: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Posterior mean with ``x̂_0 = x_t - t v`` (velocity convention ``v = ε - x_0``).

    ``μ = [(t - 2ts + s²) x_t - (t-s)(t+s-2ts) v] / (t(1-s))``; ``s`` and ``t`` of shape
    ``(B,)`` (or broadcastable).
    """
    s, t = _expand(s, x_t), _expand(t, x_t)
    return ((t - 2 * t * s + s**2) * x_t - (t - s) * (t + s - 2 * t * s) * velocity) / (t * (1 - s))


def trajectory_covariance(times: Tensor) -> Tensor:
    """Per-dimension covariance of a trajectory given ``x_0``: ``S_ij`` for levels ``t_i, t_j``.

    ``S_ij = min(t_i,t_j)² (1 - max(t_i,t_j)) / (1 - min(t_i,t_j))``.

    Args:
        times: ``(..., K)`` levels, all ``< 1``.

    Returns:
        ``(..., K, K)``.
    """
    low = torch.minimum(times[..., :, None], times[..., None, :])
    high = torch.maximum(times[..., :, None], times[..., None, :])
    return low**2 * (1 - high) / (1 - low)


def sample_trajectory(
    x0: Tensor, times: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Draws ``x_{t_0}, …, x_{t_T}`` by the Markov chain, starting from ``q(x_{t_0} | x_0)``.

    Args:
        x0: Clean data ``(B, *event)``.
        times: Increasing grid ``(B, T + 1)``.
        generator: Seeds the noise.

    Returns:
        ``(B, T + 1, *event)``; the last level is pure noise when ``t_T = 1``.
    """
    if times.dim() != 2 or times.shape[0] != x0.shape[0]:
        raise ValueError(
            f"expected times of shape (B={x0.shape[0]}, T + 1), got {tuple(times.shape)}"
        )

    def noise() -> Tensor:
        return torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)

    t0 = _expand(times[:, 0], x0)
    levels = [(1 - t0) * x0 + t0 * noise()]
    for k in range(1, times.shape[1]):
        alpha, variance = forward_kernel(times[:, k - 1], times[:, k])
        levels.append(_expand(alpha, x0) * levels[-1] + _expand(variance.sqrt(), x0) * noise())
    return torch.stack(levels, dim=1)


def paper_shift(tokens: int) -> float:
    """The paper's resolution-dependent shift ``μ = 0.5 + 0.65 (L - 256) / 3840``."""
    return 0.5 + 0.65 * (tokens - 256) / 3840


class TimeGrid(ABC):
    """A map from a step count ``T`` and per-sample ``t_min`` to a grid ``(B, T + 1)``."""

    @abstractmethod
    def levels(self, steps: int) -> Tensor:
        """Interior levels ``t_1 < … < t_T = 1`` (float64, shape ``(T,)``)."""

    def __call__(self, steps: int, t_min: Tensor) -> Tensor:
        """The grid ``t_0 = t_min < t_1 < … < t_T = 1`` for each sample.

        Raises:
            ValueError: If ``steps < 1`` or some ``t_min`` is not below ``t_1``.
        """
        if steps < 1:
            raise ValueError(f"expected steps >= 1, got {steps}")
        t_min = torch.as_tensor(t_min)
        if t_min.dim() != 1:
            raise ValueError(f"expected t_min of shape (B,), got {tuple(t_min.shape)}")
        dtype = t_min.dtype if t_min.is_floating_point() else torch.float64
        levels = self.levels(steps).to(t_min.device, dtype)
        if not bool(((t_min > 0) & (t_min < levels[0])).all()):
            raise ValueError(
                f"t_min must lie in (0, t_1 = {levels[0].item():.4g}) for {steps} steps"
            )
        return torch.cat(
            [t_min[:, None].to(levels.dtype), levels.expand(t_min.shape[0], -1)], dim=1
        )


#: Registered time grids.
SCHEDULES: Registry[type[TimeGrid]] = Registry("schedule")


@SCHEDULES.register("uniform")
class UniformGrid(TimeGrid):
    """Uniform levels ``t_k = k / T``.

    Example:
        >>> UniformGrid().levels(4).tolist()
        [0.25, 0.5, 0.75, 1.0]
    """

    def levels(self, steps: int) -> Tensor:
        return torch.arange(1, steps + 1, dtype=torch.float64) / steps


@SCHEDULES.register("shifted")
class ShiftedGrid(TimeGrid):
    """Shifted levels ``t_k = e^μ / (e^μ + 1/σ̃_k - 1)``, ``σ̃_k = k / T``.

    A positive ``shift`` μ spends more levels at high noise (large images want it).

    Args:
        shift: μ; 0 gives the uniform grid. :func:`paper_shift` gives the paper's value.

    Example:
        >>> [round(v, 3) for v in ShiftedGrid(shift=1.0).levels(4).tolist()]
        [0.475, 0.731, 0.891, 1.0]
    """

    def __init__(self, shift: float = 0.5):
        self.shift = float(shift)

    def levels(self, steps: int) -> Tensor:
        sigma = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        scale = math.exp(self.shift)
        # Written so that σ̃ = 1 gives exactly 1: (1 - σ̃) is then exactly 0.
        return scale * sigma / (scale * sigma + (1 - sigma))


def draw_t_min(
    batch: int, low: float = 1e-3, high: float = 0.05, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample ``t_min ~ U[low, high]`` (float64, shape ``(B,)``)."""
    if not 0 < low <= high < 1:
        raise ValueError(f"expected 0 < low <= high < 1, got low={low}, high={high}")
    return low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)


#: How :func:`draw_steps` weights the step counts.
StepsWeighting = Literal["uniform", "transitions"]


def draw_steps(
    choices: Sequence[int],
    generator: torch.Generator | None = None,
    weighting: StepsWeighting = "uniform",
) -> int:
    """One step count ``T`` for the whole batch, drawn from ``choices``.

    Args:
        choices: The step counts a model is trained for.
        generator: Seeds the draw.
        weighting: ``"uniform"``: every ``T`` equally often. ``"transitions"``: ``T`` with
            probability ``∝ T``, so that every transition ``(T, k)`` is drawn equally often.
            Pair-wise training scores one transition per sample: with uniform ``T`` a
            transition of ``T = 8`` gets a quarter of the samples of one of ``T = 2``.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> drawn = [draw_steps([2, 8], generator, "transitions") for _ in range(1000)]
        >>> 0.7 < drawn.count(8) / len(drawn) < 0.9  # 8 / (2 + 8) = 0.8
        True
    """
    if not choices:
        raise ValueError("expected at least one step count")
    if weighting == "transitions":
        # Each T listed T times: one uniform draw over the pool picks a uniform transition.
        choices = [step for step in choices for _ in range(step)]
    elif weighting != "uniform":
        raise ValueError(f"weighting must be 'uniform' or 'transitions', got {weighting!r}")
    return int(choices[int(torch.randint(0, len(choices), (1,), generator=generator))])


class ScheduleConfig(BaseModel):
    """How training trajectories are drawn: grid, step counts and the ``t_min`` range.

    Example:
        >>> config = ScheduleConfig(grid="shifted", shift=0.3, steps=[2, 4, 8])
        >>> config.build().levels(2).shape
        torch.Size([2])
    """

    model_config = ConfigDict(extra="forbid")

    grid: str = Field("uniform", description="Registered SCHEDULES name.")
    shift: float = Field(0.0, description="μ of the shifted grid (ignored by 'uniform').")
    steps: list[int] = Field(
        default_factory=lambda: [4], description="T drawn per batch from these."
    )
    steps_weighting: StepsWeighting = Field(
        "uniform",
        description="'uniform': every T equally often; 'transitions': T with probability ∝ T, "
        "so every transition (T, k) is trained equally often (see draw_steps).",
    )
    t_min_low: float = Field(1e-3, gt=0, lt=1, description="Lower end of the per-sample t_min.")
    t_min_high: float = Field(0.05, gt=0, lt=1, description="Upper end of the per-sample t_min.")
    t_min_eval: float = Field(
        1e-3, gt=0, lt=1, description="Fixed t_0 for sampling and evaluation."
    )

    @field_validator("grid")
    @classmethod
    def _known_grid(cls, value: str) -> str:
        return SCHEDULES.check(value)

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, value: list[int]) -> list[int]:
        if not value or any(step < 1 for step in value):
            raise ValueError(f"steps must be a non-empty list of positive integers, got {value}")
        return value

    @model_validator(mode="after")
    def _t_min_below_first_level(self) -> ScheduleConfig:
        if self.t_min_low > self.t_min_high:
            raise ValueError(
                f"t_min_low ({self.t_min_low}) must not exceed t_min_high ({self.t_min_high})"
            )
        grid = self.build()
        for steps in self.steps:
            first = grid.levels(steps)[0].item()
            for name in ("t_min_high", "t_min_eval"):
                if getattr(self, name) >= first:
                    raise ValueError(
                        f"{name} ({getattr(self, name)}) must lie below t_1 = {first:.4g} "
                        f"of the {self.grid} grid with {steps} steps"
                    )
        return self

    def build(self) -> TimeGrid:
        """The time grid this config names."""
        return ShiftedGrid(self.shift) if self.grid == "shifted" else SCHEDULES.build(self.grid)
