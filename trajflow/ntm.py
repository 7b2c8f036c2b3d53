"""Normalizing Trajectory Models: every reverse step is a conditional normalizing flow.

A shared, time-conditioned invertible *transporter* ``u = f(x; t, T)`` maps each level of a
flow-matching trajectory to u-space, where a *predictor* gives a diagonal Gaussian for the
next cleaner level. The trajectory likelihood is exact (see the Method page of the docs):

    log p(x_{t_0:t_T}) = log N(x_1; 0, I) + Σ_k [log N(u_k; μ_k, σ_k²) + log|det ∂f/∂x (x_{t_k})|]

Sampling runs the Gaussian chain in u-space and inverts the transporter once at the end.

Example:
    >>> import torch
    >>> from trajflow import NTM, Sequential, PREDICTORS
    >>> transporter = Sequential.from_specs([
    ...     {"name": "affine_coupling", "kwargs": {"features": 2, "time_features": 16}},
    ... ])
    >>> model = NTM(transporter, PREDICTORS.build("mlp", features=2, hidden_features=[32]))
    >>> out = model.loss(torch.randn(8, 2))
    >>> out.nll.shape, out.loss.dim()
    (torch.Size([8]), 0)
    >>> model.sample(3, steps=4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
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
from trajflow.core import Block, Context, Sequential
from trajflow.finetuning import FlowMatchingFinetuning
from trajflow.predictors import Predictor
from trajflow.schedules import (
    ScheduleConfig,
    _expand,
    draw_steps,
    draw_t_min,
    forward_kernel,
    posterior_coefficients,
    sample_trajectory,
)

__all__ = ["NTM", "DataBound", "NTMLoss", "gaussian_log_prob", "guided_gaussian"]

LOG_2PI = math.log(2 * math.pi)
Mode = Literal["end_to_end", "pairwise"]


def gaussian_log_prob(x: Tensor, mean: Tensor, log_std: Tensor, event_dims: int) -> Tensor:
    """``log N(x; mean, exp(log_std)²)`` summed over the last ``event_dims`` dimensions."""
    z = (x - mean) * torch.exp(-log_std)
    density = -0.5 * z.square() - log_std - 0.5 * LOG_2PI
    return density.flatten(start_dim=density.dim() - event_dims).sum(-1)


def guided_gaussian(
    mean_cond: Tensor, std_cond: Tensor, mean_uncond: Tensor, std_uncond: Tensor, weight: float
) -> tuple[Tensor, Tensor]:
    """Classifier-free guidance on a Gaussian step (STARFlow / NTM), weight ``w``.

    ``r = min((σ_c/σ_u)², 1)``, ``σ = σ_c / sqrt(1 + w - w r)``,
    ``μ = ((1+w) μ_c - w r μ_u) / (1 + w - w r)``. ``w = 0`` gives the conditional step.

    Raises:
        ValueError: If ``w`` is not a finite number ``>= 0`` (below -1 the variance would be
            negative: NaN).
    """
    weight = check_number("guided_gaussian", "the guidance weight w", weight, low=0.0)
    ratio = torch.clamp((std_cond / std_uncond).square(), max=1.0)
    norm = 1 + weight - weight * ratio
    return ((1 + weight) * mean_cond - weight * ratio * mean_uncond) / norm, std_cond / norm.sqrt()


@dataclasses.dataclass
class NTMLoss:
    """What :meth:`NTM.loss` returns.

    Attributes:
        loss: Scalar to minimise: mean trajectory NLL per data dimension (+ the auxiliary
            term, + ``x0_mse_weight`` × ``x0_mse``).
        nll: Per-sample trajectory NLL in nats ``(B,)`` (an unbiased estimate in pair-wise mode).
        bits_per_dim: ``nll / (D ln 2)`` with ``D`` the data dimension ``(B,)``.
        aux: The mean-alignment loss of a finetuned model, or ``None``.
        steps: The step count ``T`` drawn for this batch.
        x0_mse: The x̂₀ regression term of a model with ``x0_mse_weight > 0``, or ``None``.
    """

    loss: Tensor
    nll: Tensor
    bits_per_dim: Tensor
    aux: Tensor | None
    steps: int
    x0_mse: Tensor | None = None


@dataclasses.dataclass
class DataBound:
    """A lower bound on ``log p(x_{t_0})``, and what variable it is about.

    Attributes:
        log_likelihood: Per-sample bound in nats ``(B,)``.
        bits_per_dim: ``-(bound [- D log(2/K)]) / (D ln 2)`` ``(B,)``.
        variable: Plain-words statement of the variable, ``t_0``, ``T`` and dequantisation.
    """

    log_likelihood: Tensor
    bits_per_dim: Tensor
    variable: str


class NTM(FlowMatchingFinetuning, nn.Module):
    """A Normalizing Trajectory Model.

    Args:
        transporter: Invertible, time-conditioned map shared by all levels (a
            :class:`~trajflow.core.Sequential`; empty or ``None`` is the identity, which
            makes the model a Gaussian reverse chain with learned variance).
        predictor: A :class:`~trajflow.predictors.Predictor` giving ``(x̂_0 or v, δ)``.
        schedule: How trajectories are drawn (grid, step counts, ``t_min``).
        mode: ``"end_to_end"`` (all ``T`` factors) or ``"pairwise"`` (one random step per
            sample, an unbiased estimate of the same NLL at a fraction of the cost).
        cfg_dropout: Probability of replacing the condition by the null condition in training.
        time_independent_transporter: Accept a non-empty transporter none of whose blocks
            reads ``ctx.t`` (see :attr:`~trajflow.core.Block.uses_time`). The method wants a
            time-conditioned transporter, so such a transporter is rejected unless you opt
            in here: one built with ``time_features=0`` by accident would silently apply the
            same map at every level.
        x0_mse_weight: Weight λ of an x̂₀ regression term added to the training loss (not to
            the NLL it reports): ``λ · mean ‖(sg(u_out) - μ) / B‖²`` over the steps the loss
            sees, the squared error of the clean point the mean implies, per dimension. The
            likelihood weights that error by ``B² / C²``, which is tiny at the noisy steps of
            a long chain; this term gives them a mean-fitting signal of their own. ``0`` (the
            default) is the pure trajectory NLL of the method.

    Raises:
        TypeError: If the transporter is not a Block or the predictor not a Predictor.
        ValueError: For an unknown mode, a ``cfg_dropout`` outside ``[0, 1)``, or a
            transporter that ignores time without ``time_independent_transporter=True``.
    """

    def __init__(
        self,
        transporter: Block | None,
        predictor: Predictor,
        schedule: ScheduleConfig | None = None,
        mode: Mode = "end_to_end",
        cfg_dropout: float = 0.1,
        time_independent_transporter: bool = False,
        x0_mse_weight: float = 0.0,
    ):
        super().__init__()
        if transporter is not None and not isinstance(transporter, Block):
            raise TypeError(
                f"NTM expected the transporter to be a Block (e.g. a Sequential) or None, "
                f"got {type(transporter).__name__}"
            )
        if not isinstance(predictor, Predictor):
            raise TypeError(
                f"NTM expected the predictor to be a Predictor (see PREDICTORS), "
                f"got {type(predictor).__name__}"
            )
        if schedule is not None and not isinstance(schedule, ScheduleConfig):
            raise TypeError(
                f"NTM expected schedule to be a ScheduleConfig, got {type(schedule).__name__}"
            )
        if mode not in ("end_to_end", "pairwise"):
            raise ValueError(f"NTM expected mode 'end_to_end' or 'pairwise', got {mode!r}")
        check_number("NTM", "cfg_dropout", cfg_dropout, low=0.0, high=1.0, open_high=True)
        self.x0_mse_weight = check_number("NTM", "x0_mse_weight", x0_mse_weight, low=0.0)
        self._check_mode(mode, predictor)
        transporter = transporter if transporter is not None else Sequential()
        identity = isinstance(transporter, Sequential) and len(transporter) == 0
        if not identity and not transporter.uses_time and not time_independent_transporter:
            raise ValueError(
                "NTM expected a time-conditioned transporter, but none of its blocks reads "
                "ctx.t (build them with time_features > 0); pass "
                "time_independent_transporter=True if the same map at every level is intended"
            )
        self.time_independent_transporter = time_independent_transporter
        self.transporter = transporter
        self.predictor = predictor
        self.schedule = schedule or ScheduleConfig()
        self.grid = self.schedule.build()
        self.mode = mode
        self.cfg_dropout = cfg_dropout
        self.event_shape = tuple(predictor.event_shape)
        self.dimension = math.prod(self.event_shape)
        # Finetuning from flow matching; see from_flow_matching and prepare_finetuning.
        self.teacher = None
        self.aux_weight, self.aux_steps = 0.0, 0
        self.no_delta_mean = False

    # ----------------------------------------------------------------- building blocks
    def transport(self, x: Tensor, t: Tensor, steps: int | Tensor) -> tuple[Tensor, Tensor]:
        """Applies the transporter to levels ``x`` ``(B, K, *event)`` at times ``t`` ``(B, K)``.

        Returns:
            ``u`` shaped like ``x`` and the log-determinants ``(B, K)``.
        """
        batch, levels = t.shape
        steps = torch.as_tensor(steps, device=x.device).expand(batch)
        ctx = Context(t=t.reshape(-1).to(x.dtype), steps=steps.repeat_interleave(levels))
        u, logdet = self.transporter(x.flatten(0, 1), ctx)
        return u.unflatten(0, (batch, levels)), logdet.reshape(batch, levels)

    def untransport(self, u: Tensor, t: Tensor, steps: int | Tensor) -> Tensor:
        """Inverse of :meth:`transport` for one level: ``u`` ``(B, *event)``, ``t`` ``(B,)``."""
        steps = torch.as_tensor(steps, device=u.device).expand(u.shape[0])
        return self.transporter.inverse(u, Context(t=t.to(u.dtype), steps=steps))[0]

    def gaussian(
        self,
        u_in: Tensor,
        t_in: Tensor,
        t_out: Tensor,
        steps: int | Tensor,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mean and log-std of ``u_{t_out}`` given ``u_in`` at ``t_in``, for ``K`` levels at once.

        ``μ = A u_in + B x̂_0`` and ``log σ = log C + δ`` with the posterior coefficients of
        the step ``t_out < t_in``.
        """
        batch = u_in.shape[0]
        steps = torch.as_tensor(steps, device=u_in.device).expand(batch)
        t_in_net, t_out_net = t_in.to(u_in.dtype), t_out.to(u_in.dtype)
        head, delta = self.predictor(u_in, t_in_net, t_out_net, steps, y, y_mask, drop)
        a, b, c2 = (_expand(v, u_in) for v in posterior_coefficients(t_out, t_in))
        clean = head if self.predictor.target == "x0" else u_in - _expand(t_in, u_in) * head
        return a * u_in + b * clean, 0.5 * torch.log(c2) + delta

    # ----------------------------------------------------------------- likelihoods
    def trajectory_log_prob(
        self,
        trajectory: Tensor,
        times: Tensor,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """Exact ``log p(x_{t_0}, …, x_{t_T})`` of trajectories ``(B, T + 1, *event)``.

        Args:
            trajectory: Levels from clean-most to ``t_T = 1``.
            times: Their times ``(B, T + 1)``, increasing, ending at 1.
            y, y_mask, drop: Condition, its token mask and per-sample prompt dropout.
        """
        factors = self.factor_log_probs(trajectory, times, y, y_mask, drop)
        return factors[:, -1] + factors[:, :-1].sum(dim=1)

    def factor_log_probs(
        self,
        trajectory: Tensor,
        times: Tensor,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        """The factors of :meth:`trajectory_log_prob`, one column each ``(B, T + 1)``.

        Column ``k < T`` is ``log N(u_k; μ_k, σ_k²) + log|det ∂f/∂x (x_{t_k})|``, the step into
        level ``k`` (``k = 0`` the clean-most); column ``T`` is ``log N(x_1; 0, I)``. They sum
        to the trajectory log-likelihood; each says what the model earns at one level.

        Example:
            >>> import torch
            >>> from trajflow.config import toy_ntm_config
            >>> model = toy_ntm_config(predictor_hidden=[8], transporter_layers=1).build()
            >>> times = model.grid(4, torch.full((2,), 1e-3, dtype=torch.float64))
            >>> trajectory = torch.randn(2, 5, 2)
            >>> model.factor_log_probs(trajectory, times).shape
            torch.Size([2, 5])
        """
        self._check_levels(trajectory, times)
        return self._factor_log_probs(trajectory, times, y, y_mask, drop)[0]

    def _factor_log_probs(
        self, trajectory, times, y, y_mask, drop, with_x0_mse: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`factor_log_probs` and, with ``with_x0_mse``, :meth:`_x0_mse` over all steps."""
        steps = times.shape[1] - 1
        event_dims = len(self.event_shape)
        u, logdet = self.transport(trajectory[:, :steps], times[:, :steps], steps)
        u_in = torch.cat([u[:, 1:], trajectory[:, steps:]], dim=1)  # u_T = x_1: no transporter
        mean, log_std = self.gaussian(u_in, times[:, 1:], times[:, :-1], steps, y, y_mask, drop)
        steps_log_prob = gaussian_log_prob(u, mean, log_std, event_dims) + logdet
        top = self._top_log_prob(trajectory[:, -1])
        x0_mse = self._x0_mse(u, mean, times[:, :-1], times[:, 1:]) if with_x0_mse else None
        return torch.cat([steps_log_prob, top[:, None]], dim=1), x0_mse

    def _top_log_prob(self, x1: Tensor) -> Tensor:
        """``log N(x_1; 0, I)`` per sample."""
        zeros = torch.zeros_like(x1)
        return gaussian_log_prob(x1, zeros, zeros, len(self.event_shape))

    def _x0_mse(self, u_out: Tensor, mean: Tensor, t_out: Tensor, t_in: Tensor) -> Tensor:
        """Mean of ``((sg(u_out) - μ) / B)²`` over samples, steps and dimensions.

        ``u_out = A u_in + B x_0 + C ε``, so ``(u_out - A u_in) / B`` is ``x_0`` plus noise of
        scale ``C / B`` and the term is a regression of the implied ``x̂_0`` onto it; ``u_out``
        is a target, hence detached (its gradient stays the likelihood's alone).
        """
        b = _expand(posterior_coefficients(t_out, t_in).b, mean).to(mean.dtype)
        return ((u_out.detach() - mean) / b).square().mean()

    def _pairwise_log_prob(
        self,
        trajectory,
        times,
        y,
        y_mask,
        drop,
        generator,
        with_aux: bool = False,
        with_x0_mse: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Unbiased estimate ``log N(x_1) + T · (term of one random step k)`` per sample.

        With ``with_aux`` also the mean-alignment loss on the same random step: an unbiased
        estimate of :meth:`_alignment_loss` that reuses this step's ``μ_P`` instead of running
        the predictor and the teacher on every level (``T`` times cheaper). With
        ``with_x0_mse`` likewise an unbiased estimate of the end-to-end :meth:`_x0_mse`.
        """
        batch, steps = times.shape[0], times.shape[1] - 1
        event_dims = len(self.event_shape)
        k = torch.randint(0, steps, (batch,), generator=generator).to(trajectory.device)
        rows = torch.arange(batch, device=trajectory.device)
        pair = torch.stack([trajectory[rows, k], trajectory[rows, k + 1]], dim=1)
        pair_times = torch.stack([times[rows, k], times[rows, k + 1]], dim=1)
        u, logdet = self.transport(pair, pair_times, steps)
        # The noisiest level x_1 is not transported: use it as is where k + 1 == T.
        top_level = (k + 1 == steps).reshape(-1, *([1] * len(self.event_shape)))
        u_in = torch.where(top_level, pair[:, 1], u[:, 1])
        mean, log_std = self.gaussian(
            u_in[:, None], pair_times[:, 1:], pair_times[:, :1], steps, y, y_mask, drop
        )
        term = gaussian_log_prob(u[:, :1], mean, log_std, event_dims)[:, 0] + logdet[:, 0]
        top = self._top_log_prob(trajectory[:, -1])
        x0_mse = None
        if with_x0_mse:
            x0_mse = self._x0_mse(u[:, :1], mean, pair_times[:, :1], pair_times[:, 1:])
        aux = None
        if with_aux:
            target = self._teacher_mean(
                pair[:, 1:], pair_times[:, 1:], pair_times[:, :1], y, y_mask, drop
            )
            aux = (mean - target).square().mean()
        return top + steps * term, aux, x0_mse

    def loss(
        self,
        x0: Tensor,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        mode: Mode | None = None,
        step: int = 0,
        generator: torch.Generator | None = None,
    ) -> NTMLoss:
        """Trajectory NLL of forward trajectories drawn from ``x0`` (the training loss).

        Draws ``T`` for the batch and ``t_min`` per sample from the schedule, a trajectory per
        sample, and (with a condition) drops it with probability ``cfg_dropout``.

        Args:
            x0: Clean data ``(B, *event)``.
            y: Optional condition; y_mask: its token mask.
            mode: Overrides the model's mode for this call.
            step: Training step (drives the decay of the auxiliary loss weight).
            generator: Seeds every random draw.

        Raises:
            TypeError, ValueError: For data that is not a finite, non-empty floating batch
                ``(B, *event)`` of the model's dtype, a non-finite condition, or a bad mode.
        """
        self._check_data("NTM.loss", "x0", x0, y)
        step = check_count("NTM.loss", "step", step, minimum=0)
        mode = self.mode if mode is None else mode
        if mode not in ("end_to_end", "pairwise"):
            raise ValueError(f"NTM.loss expected mode 'end_to_end' or 'pairwise', got {mode!r}")
        self._check_mode(mode, self.predictor)
        batch = x0.shape[0]
        steps = draw_steps(self.schedule.steps, generator, self.schedule.steps_weighting)
        t_min = draw_t_min(batch, self.schedule.t_min_low, self.schedule.t_min_high, generator)
        times = self.grid(steps, t_min).to(x0.device)
        trajectory = sample_trajectory(x0, times, generator)
        drop = None
        if y is not None and self.cfg_dropout > 0:
            drop = (torch.rand(batch, generator=generator) < self.cfg_dropout).to(x0.device)
        wants_aux = self.teacher is not None and self.aux_weight > 0
        wants_x0_mse = self.x0_mse_weight > 0
        aux = None
        if mode == "end_to_end":
            factors, x0_mse = self._factor_log_probs(
                trajectory, times, y, y_mask, drop, with_x0_mse=wants_x0_mse
            )
            log_prob = factors[:, -1] + factors[:, :-1].sum(dim=1)
            if wants_aux:
                aux = self._alignment_loss(trajectory, times, steps, y, y_mask, drop)
        else:
            log_prob, aux, x0_mse = self._pairwise_log_prob(
                trajectory, times, y, y_mask, drop, generator, wants_aux, wants_x0_mse
            )
        nll = -log_prob
        loss = nll.mean() / self.dimension
        if aux is not None:
            loss = loss + self.aux_weight_at(step) * aux
        if x0_mse is not None:
            loss = loss + self.x0_mse_weight * x0_mse
        bits = nll.detach() / (self.dimension * math.log(2))
        return NTMLoss(loss, nll.detach(), bits, aux, steps, x0_mse)

    @torch.no_grad()
    def data_bound(
        self,
        x: Tensor,
        steps: int = 4,
        t0: float | None = None,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        quantization_levels: int | None = None,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> DataBound:
        """Variational lower bound on ``log p(x_{t_0})``, ``x_{t_0} = (1 - t_0) x + t_0 ε``.

        ``log p(x_{t_0}) ≥ E_q[log p(x_{t_0:t_T}) - log q(x_{t_1:t_T} | x_{t_0})]``, averaged over
        ``samples`` forward trajectories.

        Args:
            x: Data ``(B, *event)``.
            steps: ``T`` of the evaluation grid.
            t0: The fixed ``t_0`` (default: the schedule's ``t_min_eval``).
            y: Condition of every point, for a conditional predictor.
            y_mask: Its token mask, for conditioning tokens.
            quantization_levels: ``K`` if ``x`` is uniformly dequantised data on ``K`` levels
                mapped to ``[-1, 1]``; bits/dim then bound ``-log P(k)``.
            samples: Monte Carlo trajectories per point.
            generator: Seeds the forward trajectories.

        Raises:
            TypeError, ValueError: For data that is not a finite, non-empty floating batch
                ``(B, *event)`` of the model's dtype, or a bad ``steps``, ``t0``, ``samples``
                or ``quantization_levels``.
        """
        owner = "NTM.data_bound"
        self._check_data(owner, "x", x, y)
        steps = check_count(owner, "steps", steps)
        samples = check_count(owner, "samples", samples)
        if quantization_levels is not None:
            quantization_levels = check_count(owner, "quantization_levels", quantization_levels, 2)
        t0 = self.schedule.t_min_eval if t0 is None else t0
        t0 = check_first_level(owner, "t0", t0, self.grid, steps)
        times = self.grid(steps, torch.full((x.shape[0],), t0, dtype=torch.float64)).to(x.device)
        event_dims = len(self.event_shape)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for _ in range(samples):
            trajectory = sample_trajectory(x, times, generator)
            log_joint = self.trajectory_log_prob(trajectory, times, y, y_mask)
            log_forward = torch.zeros_like(log_joint)
            for k in range(steps):
                alpha, variance = forward_kernel(times[:, k], times[:, k + 1])
                mean = _expand(alpha, x) * trajectory[:, k]
                log_std = _expand(0.5 * torch.log(variance), x).expand_as(mean)
                log_forward = log_forward + gaussian_log_prob(
                    trajectory[:, k + 1], mean, log_std, event_dims
                )
            total = total + (log_joint - log_forward).double()
        bound = total / samples
        nats = -bound
        variable = f"x_t0 = (1 - t0) x + t0 ε, t0 = {t0:g}, T = {steps}"
        if quantization_levels is not None:
            nats = nats - self.dimension * math.log(2 / quantization_levels)
            variable += f", K = {quantization_levels} uniform dequantisation to [-1, 1]"
        return DataBound(bound, nats / (self.dimension * math.log(2)), variable)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int = 4,
        cfg: float = 0.0,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        t_min: float | None = None,
        return_trajectory: bool = False,
    ) -> Tensor:
        """Draws ``n`` samples with ``steps`` Gaussian steps in u-space and one inverse at the end.

        Args:
            n: Number of samples.
            steps: ``T``, any positive integer (trained values work best).
            cfg: Guidance weight ``w`` on ``(μ, σ)``; needs a conditional predictor.
            y, y_mask: Condition of every sample (batch ``n``).
            temperature: Scales the noise of every step (and of ``u_T``).
            generator: Seeds the noise: the same seed gives the same samples.
            t_min: Final level ``t_0`` (default: the schedule's ``t_min_eval``).
            return_trajectory: Also return the u-space levels ``(n, T + 1, *event)``.

        Returns:
            ``x_{t_0}`` ``(n, *event)`` (and the u-trajectory if asked).

        Raises:
            TypeError, ValueError: For ``n`` or ``steps`` not an integer ``>= 1``, ``cfg`` or
                ``temperature`` not a finite number ``>= 0``, ``t_min`` outside ``(0, 1)``,
                guidance without a conditional predictor, or a non-finite ``y``.
        """
        u, times = self.sample_chain(
            n, steps, cfg, y, y_mask, temperature, generator, t_min, owner="NTM.sample"
        )
        x = self.untransport(u[:, 0], times[:, 0], steps)
        return (x, u) if return_trajectory else x

    @torch.no_grad()
    def sample_chain(
        self,
        n: int,
        steps: int = 4,
        cfg: float = 0.0,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        t_min: float | None = None,
        owner: str = "NTM.sample_chain",
    ) -> tuple[Tensor, Tensor]:
        """The Gaussian chain of :meth:`sample` in u-space, without the final inverse.

        The denoisers of :mod:`trajflow.denoise` start from it: the score path inverts every
        level in one batched call, the learned denoiser none. Arguments as for :meth:`sample`.

        Returns:
            The u-trajectory ``(n, T + 1, *event)`` (clean-most first) and its times
            ``(n, T + 1)``.
        """
        n = check_count(owner, "n", n)
        steps = check_count(owner, "steps", steps)
        cfg = check_number(owner, "the guidance weight cfg", cfg, low=0.0)
        temperature = check_number(owner, "temperature", temperature, low=0.0)
        if cfg and not self.predictor.cond_features:
            raise ValueError("classifier-free guidance needs a predictor with cond_features > 0")
        if isinstance(y, Tensor):
            check_finite(owner, "y", y)
        device, dtype = self._device_dtype()
        t_min = self.schedule.t_min_eval if t_min is None else t_min
        t_min = check_first_level(owner, "t_min", t_min, self.grid, steps)
        times = self.grid(steps, torch.full((n,), t_min, dtype=torch.float64)).to(device)

        def noise() -> Tensor:
            return torch.randn((n, *self.event_shape), generator=generator, dtype=dtype).to(device)

        u = temperature * noise()
        history = [u]  # u_T, u_{T-1}, …: the causal predictor reads all noisier levels
        causal = getattr(self.predictor, "level_attention", "markov") == "causal"
        for k in range(steps - 1, -1, -1):
            inputs = torch.stack(history[::-1], dim=1) if causal else u[:, None]
            t_in = times[:, k + 1 : steps + 1] if causal else times[:, k + 1 : k + 2]
            t_out = times[:, k:steps] if causal else times[:, k : k + 1]
            mean, log_std = self._guided_step(inputs, t_in, t_out, steps, y, y_mask, cfg)
            u = mean + temperature * torch.exp(log_std) * noise()
            history.append(u)
        return torch.stack(history[::-1], dim=1), times

    def _guided_step(self, inputs, t_in, t_out, steps, y, y_mask, cfg) -> tuple[Tensor, Tensor]:
        """The first level's Gaussian, with guidance when ``cfg != 0``."""
        if not cfg:
            mean, log_std = self.gaussian(inputs, t_in, t_out, steps, y, y_mask)
            return mean[:, 0], log_std[:, 0]
        batch = inputs.shape[0]
        drop = torch.arange(2 * batch, device=inputs.device) >= batch  # [conditional, null]
        twice = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
        mean, log_std = self.gaussian(
            twice(inputs), twice(t_in), twice(t_out), steps, twice(y), twice(y_mask), drop
        )
        mean_c, mean_u = mean[:, 0].chunk(2)
        std_c, std_u = torch.exp(log_std[:, 0]).chunk(2)
        mean, std = guided_gaussian(mean_c, std_c, mean_u, std_u, cfg)
        return mean, torch.log(std)

    # ----------------------------------------------------------------- checks
    @staticmethod
    def _check_mode(mode: str, predictor: Predictor) -> None:
        if mode == "pairwise" and getattr(predictor, "level_attention", "markov") == "causal":
            raise ValueError(
                "pairwise mode needs a markov predictor: with level_attention='causal' step k "
                "reads every noisier level, which a single pair does not hold"
            )

    def _event_text(self) -> str:
        return ", ".join(map(str, self.event_shape))

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the model lives and its floating dtype (CPU float32 without parameters)."""
        for tensor in itertools.chain(self.predictor.parameters(), self.transporter.parameters()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
        return torch.device("cpu"), torch.get_default_dtype()

    def _check_data(self, owner: str, name: str, x: Tensor, y: Tensor | None) -> None:
        check_data(owner, name, x, self.event_shape, self._device_dtype()[1])
        if isinstance(y, Tensor):
            check_finite(owner, "y", y)

    def _check_levels(self, trajectory: Tensor, times: Tensor) -> None:
        if (
            trajectory.dim() != 2 + len(self.event_shape)
            or tuple(trajectory.shape[2:]) != self.event_shape
        ):
            raise ValueError(
                f"expected a trajectory of shape (B, T + 1, {self._event_text()}), "
                f"got {tuple(trajectory.shape)}"
            )
        if times.shape != trajectory.shape[:2] or times.shape[1] < 2:
            raise ValueError(
                f"expected times of shape {tuple(trajectory.shape[:2])} with T >= 1, "
                f"got {tuple(times.shape)}"
            )
