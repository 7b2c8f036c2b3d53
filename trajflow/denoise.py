"""Denoising an NTM sample: trajectory score denoising and a learned one-pass denoiser.

An NTM sample ends at ``x_{t_0}``, a little noisy (``t_0 > 0``). Its exact likelihood gives
the score of the whole trajectory, and *trajectory Tweedie* (method notes §7) turns that score
into the posterior mean of the clean point: for any level ``i < T``,

    x̂_0 = (x_{t_i} - Σ_j S_ij ∂L/∂x_{t_j}) / (1 - t_i),
    S_ij = min(t_i, t_j)² (1 - max(t_i, t_j)) / (1 - min(t_i, t_j)),

with ``L = -log p(x_{t_0:t_T})`` summed over every dimension, and ``S`` the covariance of the
forward trajectory given ``x_0`` (per dimension). ``S_iT = 0``: the ``t = 1`` level is
independent of everything else under the forward process, so it never enters the update (and
it is never transported: ``u_T = x_1``). For Gaussian data the result is exactly
``E[x_0 | trajectory]``; the tests check this against Gaussian conditioning.

The score path needs ``x`` at every level (one inversion of the transporter per level, done
as one batched call) and a backward pass. A :class:`LearnedDenoiser` ``g_φ(u_{t_0}, y) → x̂_0``
replaces both: it is trained by MSE on score-denoised forward trajectories of real data
(:func:`denoiser_targets`, :func:`denoiser_loss`) and sampled with :func:`sample_with_denoiser`.

Example:
    >>> import torch
    >>> from trajflow import NTM, PREDICTORS
    >>> model = NTM(None, PREDICTORS.build("mlp", features=2, hidden_features=[16]))
    >>> generator = torch.Generator().manual_seed(0)
    >>> sample_denoised(model, 5, steps=4, generator=generator).shape
    torch.Size([5, 2])
    >>> denoiser = DENOISERS.build("transformer", features=2, dim=16, layers=1, heads=2)
    >>> u_t0, target = denoiser_targets(model, torch.randn(8, 2), steps=4, generator=generator)
    >>> denoiser_loss(denoiser, u_t0, target).dim()
    0
    >>> sample_with_denoiser(model, denoiser, 3, steps=4, generator=generator).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from trajflow.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from trajflow.checks import check_count, check_data, check_finite, check_number
from trajflow.nn import TransformerLayer
from trajflow.ntm import NTM
from trajflow.registry import Registry, Spec
from trajflow.schedules import sample_trajectory, trajectory_covariance

__all__ = [
    "DENOISERS",
    "LearnedDenoiser",
    "denoiser_loss",
    "denoiser_targets",
    "invert_trajectory",
    "load_denoiser",
    "sample_denoised",
    "sample_u_trajectory",
    "sample_with_denoiser",
    "save_denoiser",
    "trajectory_score_denoise",
    "trajectory_tweedie",
]


# --------------------------------------------------------------------------- checks
def _check_model(owner: str, model: object) -> None:
    if not isinstance(model, NTM):
        raise TypeError(f"{owner} expected an NTM as model, got {type(model).__name__}")


def _check_trajectory(owner: str, name: str, model: NTM, trajectory: Tensor, times: Tensor):
    """``trajectory`` ``(B, T + 1, *event)`` and its ``times`` ``(B, T + 1)``, ending at 1."""
    event = ", ".join(map(str, model.event_shape))
    if not isinstance(trajectory, Tensor) or not trajectory.is_floating_point():
        raise TypeError(f"{owner} expected {name} to be a floating-point torch.Tensor")
    if (
        trajectory.dim() != 2 + len(model.event_shape)
        or tuple(trajectory.shape[2:]) != model.event_shape
        or trajectory.shape[1] < 2
    ):
        raise ValueError(
            f"{owner} expected {name} of shape (B, T + 1, {event}) with T >= 1, "
            f"got {tuple(trajectory.shape)}"
        )
    check_finite(owner, name, trajectory)
    if not isinstance(times, Tensor) or times.shape != trajectory.shape[:2]:
        got = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(
            f"{owner} expected times of shape {tuple(trajectory.shape[:2])}, got {got}"
        )
    check_finite(owner, "times", times)
    increasing = bool((times[:, 1:] > times[:, :-1]).all()) and bool((times[:, 0] > 0).all())
    if not increasing or not bool((times[:, -1] == 1).all()):
        raise ValueError(
            f"{owner} expected times increasing from t_0 > 0 and ending at t_T = 1 "
            f"(e.g. model.grid(steps, t_min)), got rows such as {times[0].tolist()}"
        )


def _check_condition(owner: str, y: Tensor | None) -> None:
    if isinstance(y, Tensor):
        check_finite(owner, "y", y)


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a module lives and its floating dtype (CPU, default dtype without parameters)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# --------------------------------------------------------------------------- score path
@torch.no_grad()
def invert_trajectory(model: NTM, u_trajectory: Tensor, times: Tensor) -> Tensor:
    """Maps a u-space trajectory back to x-space, level by level.

    The ``T`` inversions (levels ``t_0 … t_{T-1}``) are independent, so they run as one call
    with the levels folded into the batch, each with its own time. The ``t = 1`` level has no
    transporter (``u_T = x_1``) and is copied.

    Args:
        model: The NTM whose transporter to invert.
        u_trajectory: ``(B, T + 1, *event)`` from clean-most to ``t_T = 1``.
        times: ``(B, T + 1)``.

    Returns:
        The x-space trajectory, shaped like ``u_trajectory``.
    """
    owner = "invert_trajectory"
    _check_model(owner, model)
    _check_trajectory(owner, "u_trajectory", model, u_trajectory, times)
    steps = times.shape[1] - 1
    lower = u_trajectory[:, :steps]
    x = model.untransport(lower.flatten(0, 1), times[:, :steps].flatten(), steps)
    return torch.cat([x.unflatten(0, lower.shape[:2]), u_trajectory[:, steps:]], dim=1)


def trajectory_tweedie(
    model: NTM,
    trajectory: Tensor,
    times: Tensor,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    all_levels: bool = False,
) -> Tensor:
    """Trajectory Tweedie on an x-space trajectory: ``x̂_0 = (x_i - Σ_j S_ij ∂L/∂x_j)/(1 - t_i)``.

    ``L = -log p(x_{t_0:t_T} | y)`` of :meth:`~trajflow.ntm.NTM.trajectory_log_prob`, summed
    over every dimension (a per-dimension mean would shrink the score by ``D``). The gradient
    is taken with respect to the levels ``t_0 … t_{T-1}`` only: ``S_iT = 0``, so the ``t = 1``
    level never enters the update. Works under ``torch.no_grad`` too; the model's parameters
    get no gradient.

    Args:
        model: The NTM (frozen: nothing about it changes).
        trajectory: x-space levels ``(B, T + 1, *event)``, clean-most first, ending at ``x_1``.
        times: ``(B, T + 1)``, increasing from ``t_0 > 0`` to ``t_T = 1``.
        y, y_mask: The condition (and its token mask) the score is conditioned on.
        all_levels: Return the estimate of every level ``i < T`` ``(B, T, *event)`` (equal
            for an exact model) instead of the one at ``t_0`` ``(B, *event)``.

    Returns:
        ``x̂_0`` at ``t_0`` ``(B, *event)``, or at every level ``i < T``.

    Raises:
        TypeError, ValueError: For a trajectory or times of the wrong shape, non-finite
            values, or times that do not increase to 1.
    """
    owner = "trajectory_tweedie"
    _check_model(owner, model)
    _check_trajectory(owner, "trajectory", model, trajectory, times)
    _check_condition(owner, y)
    steps = times.shape[1] - 1
    with torch.enable_grad():
        lower = trajectory[:, :steps].detach().requires_grad_(True)
        levels = torch.cat([lower, trajectory[:, steps:].detach()], dim=1)
        nll = -model.trajectory_log_prob(levels, times, y, y_mask).sum()
        (score,) = torch.autograd.grad(nll, lower)
    # Samples are independent, so summing the batch's NLLs leaves each one's gradient intact.
    covariance = trajectory_covariance(times[:, :steps]).to(score)  # (B, T, T), times < 1
    shift = torch.bmm(covariance, score.flatten(2))
    scale = (1 - times[:, :steps]).to(score)[:, :, None]
    estimate = ((lower.detach().flatten(2) - shift) / scale).unflatten(2, model.event_shape)
    return estimate if all_levels else estimate[:, 0]


def trajectory_score_denoise(
    model: NTM,
    u_trajectory: Tensor,
    times: Tensor,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    all_levels: bool = False,
) -> Tensor:
    """Denoises a sampled u-space trajectory: invert every level, then trajectory Tweedie.

    Args:
        model: The NTM that sampled it.
        u_trajectory: ``(B, T + 1, *event)`` as :meth:`~trajflow.ntm.NTM.sample` returns with
            ``return_trajectory=True`` (or :func:`sample_u_trajectory`).
        times: Its grid ``(B, T + 1)`` (``model.grid(T, t_min)``).
        y, y_mask: The condition. all_levels: See :func:`trajectory_tweedie`.

    Returns:
        ``x̂_0`` ``(B, *event)`` (or ``(B, T, *event)`` with ``all_levels``).
    """
    x = invert_trajectory(model, u_trajectory, times)
    return trajectory_tweedie(model, x, times, y, y_mask, all_levels)


# --------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_u_trajectory(
    model: NTM,
    n: int,
    steps: int = 4,
    cfg: float = 0.0,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    t_min: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The Gaussian chain of :meth:`~trajflow.ntm.NTM.sample` in u-space, without the inverse.

    Draws the noise in the same order as ``NTM.sample``, so with the same generator it gives
    the u-trajectory that ``NTM.sample(..., return_trajectory=True)`` returns (a test keeps
    the two in step). The denoisers need the chain without the final transporter inverse: the
    score path inverts all levels in one batched call, the learned denoiser none.

    Returns:
        The u-trajectory ``(n, T + 1, *event)`` (clean-most first) and its times ``(n, T + 1)``.
    """
    owner = "sample_u_trajectory"
    _check_model(owner, model)
    _check_condition(owner, y)
    return model.sample_chain(n, steps, cfg, y, y_mask, temperature, generator, t_min, owner=owner)


def sample_denoised(
    model: NTM,
    n: int,
    steps: int = 4,
    cfg: float = 0.0,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    t_min: float | None = None,
) -> Tensor:
    """Samples ``n`` points and returns their trajectory-score-denoised ``x̂_0``.

    Guidance (``cfg > 0``) shapes the sampled chain only; the score is that of the
    *conditional* model ``p(x_{t_0:t_T} | y)``. The guided chain is no normalised density of
    the model, and the conditional one is what the learned denoiser is trained against, so
    both denoisers estimate the same quantity.

    Arguments are those of :meth:`~trajflow.ntm.NTM.sample`.

    Returns:
        ``x̂_0`` ``(n, *event)``.
    """
    u, times = sample_u_trajectory(model, n, steps, cfg, y, y_mask, temperature, generator, t_min)
    return trajectory_score_denoise(model, u, times, y, y_mask)


# --------------------------------------------------------------------------- learned denoiser
#: Registered learned denoisers.
DENOISERS: Registry[type[nn.Module]] = Registry("denoiser")


@DENOISERS.register("transformer")
class LearnedDenoiser(nn.Module):
    """``g_φ(u_{t_0}, y) → x̂_0``: a light non-causal transformer over the tokens of ``u_{t_0}``.

    Tokens ``(B, L, C)`` (or vectors ``(B, D)``, read as ``D`` one-channel tokens) get an input
    projection and learned positions; conditioning tokens ``y`` ``(B, M, F)`` (or a vector
    ``(B, F)``, one token) are projected and prepended, padding masked by ``y_mask``. Every
    token attends to every other. The output is ``u_{t_0} + head(h)`` with a zero-initialised
    head: at ``t_0 ≈ 0`` and with a near-identity transporter ``u_{t_0} ≈ x_0`` already, so
    the untrained denoiser is the cheapest sensible guess (skip the inverse).

    Args:
        features: Channels ``C`` per token (``D`` for vectors).
        tokens: Tokens ``L`` per sample; ``None`` for vector data ``(B, D)``.
        dim: Width. layers: Depth. heads: Attention heads. mlp_ratio: MLP width factor.
        cond_features: Width ``F`` of the condition (0: unconditional).

    Example:
        >>> g = LearnedDenoiser(features=2, tokens=4, dim=16, layers=1, heads=2)
        >>> u = torch.randn(3, 4, 2)
        >>> torch.allclose(g(u), u)  # zero-initialised head: starts as the identity
        True
        >>> g.spec.name
        'transformer'
    """

    def __init__(
        self,
        features: int,
        tokens: int | None = None,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        cond_features: int = 0,
    ):
        super().__init__()
        owner = "LearnedDenoiser"
        features = check_count(owner, "features", features)
        tokens = None if tokens is None else check_count(owner, "tokens", tokens)
        dim, heads = check_count(owner, "dim", dim), check_count(owner, "heads", heads)
        layers = check_count(owner, "layers", layers)
        cond_features = check_count(owner, "cond_features", cond_features, minimum=0)
        mlp_ratio = check_number(owner, "mlp_ratio", mlp_ratio, low=0.0, open_low=True)
        if dim % heads:
            raise ValueError(f"{owner} expected dim ({dim}) divisible by heads ({heads})")
        self.spec = Spec(
            name="transformer",
            kwargs={"features": features, "tokens": tokens, "dim": dim, "layers": layers,
                    "heads": heads, "mlp_ratio": mlp_ratio, "cond_features": cond_features},
        )  # fmt: skip
        self.event_shape = (features,) if tokens is None else (tokens, features)
        self.cond_features = cond_features
        length, channels = (features, 1) if tokens is None else (tokens, features)
        self.input = nn.Linear(channels, dim)
        self.positions = nn.Parameter(0.02 * torch.randn(length, dim))
        self.condition = nn.Linear(cond_features, dim) if cond_features else None
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, u: Tensor, y: Tensor | None = None, y_mask: Tensor | None = None) -> Tensor:
        """``x̂_0`` from ``u_{t_0}`` ``(B, *event)`` and the optional condition."""
        owner = "LearnedDenoiser"
        check_data(owner, "u", u, self.event_shape, self.head.weight.dtype)
        batch = u.shape[0]
        tokens = u.reshape(batch, -1, self.input.in_features)
        h = self.input(tokens) + self.positions.to(u.dtype)
        prefix, mask = self._prefix(y, y_mask, batch, u)
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)
        for layer in self.layers:
            h = layer(h, None, 0, mask)[0]
        h = self.norm(h[:, h.shape[1] - tokens.shape[1] :])
        return u + self.head(h).reshape(u.shape)

    def _prefix(self, y, y_mask, batch, like) -> tuple[Tensor | None, Tensor | None]:
        """Projected condition tokens and the key mask over ``[prefix, u tokens]``."""
        owner = "LearnedDenoiser"
        if y is None:
            if y_mask is not None:
                raise ValueError(f"{owner} got y_mask without y")
            return None, None
        if not self.cond_features:
            raise ValueError(f"{owner} was built with cond_features=0 but got y")
        if not isinstance(y, Tensor) or y.dim() not in (2, 3) or y.shape[0] != batch:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{owner} expected y of shape (B={batch}, [M,] F), got {got}")
        if y.shape[-1] != self.cond_features:
            raise ValueError(
                f"{owner} expected y with F={self.cond_features} features, got {tuple(y.shape)}"
            )
        check_finite(owner, "y", y)
        y = y[:, None] if y.dim() == 2 else y
        if y_mask is None:
            return self.condition(y.to(like.dtype)), None
        if not isinstance(y_mask, Tensor) or y_mask.dtype != torch.bool:
            raise TypeError(f"{owner} expected a bool y_mask tensor")
        if y_mask.shape != y.shape[:2]:
            raise ValueError(
                f"{owner} expected y_mask of shape {tuple(y.shape[:2])}, got {tuple(y_mask.shape)}"
            )
        # Padding is hidden as a key; the u tokens are always valid keys, so no row is empty.
        keys = torch.cat([y_mask, y_mask.new_ones(batch, self.positions.shape[0])], dim=1)
        return self.condition(y.to(like.dtype)), keys[:, None, None, :]


def denoiser_targets(
    model: NTM,
    x0: Tensor,
    steps: int = 4,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    t0: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Training pairs for a learned denoiser: ``u_{t_0}`` and its score-denoised ``x̂_0``.

    Forward trajectories of the *real* data ``x0`` are drawn on the model's grid with ``T =
    steps`` from ``t_0`` (the schedule's ``t_min_eval``, where sampling ends), level ``t_0``
    is transported to u-space (the denoiser's input), and the frozen model's trajectory
    Tweedie on the x-space trajectory gives the target.

    Returns:
        ``(u_t0, target)``, both ``(B, *event)`` and detached.
    """
    owner = "denoiser_targets"
    _check_model(owner, model)
    check_data(owner, "x0", x0, model.event_shape, _device_dtype(model)[1])
    _check_condition(owner, y)
    steps = check_count(owner, "steps", steps)
    t0 = model.schedule.t_min_eval if t0 is None else t0
    t0 = check_number(owner, "t0", t0, low=0.0, high=1.0, open_low=True, open_high=True)
    times = model.grid(steps, torch.full((x0.shape[0],), t0, dtype=torch.float64)).to(x0.device)
    trajectory = sample_trajectory(x0, times, generator)
    with torch.no_grad():
        u_t0 = model.transport(trajectory[:, :1], times[:, :1], steps)[0][:, 0]
    target = trajectory_tweedie(model, trajectory, times, y, y_mask)
    return u_t0, target.detach()


def denoiser_loss(
    denoiser: nn.Module,
    u_t0: Tensor,
    target: Tensor,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
) -> Tensor:
    """Mean squared error of ``denoiser(u_t0, y, y_mask)`` against ``target`` (a scalar)."""
    if not isinstance(target, Tensor) or not isinstance(u_t0, Tensor):
        raise TypeError("denoiser_loss expected tensors u_t0 and target")
    if target.shape != u_t0.shape:
        raise ValueError(
            f"denoiser_loss expected target shaped like u_t0 {tuple(u_t0.shape)}, "
            f"got {tuple(target.shape)}"
        )
    return (denoiser(u_t0, y, y_mask) - target).square().mean()


@torch.no_grad()
def sample_with_denoiser(
    model: NTM,
    denoiser: nn.Module,
    n: int,
    steps: int = 4,
    cfg: float = 0.0,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    t_min: float | None = None,
) -> Tensor:
    """Samples with the Gaussian chain and maps ``u_{t_0}`` to ``x̂_0`` with ``denoiser``.

    The learned denoiser replaces both the (autoregressive) transporter inverse and the score
    step: no inverse and no backward pass. The denoiser gets the same condition as the chain
    if it takes one (``cond_features > 0``); an unconditional denoiser reads ``u_{t_0}`` only.
    Arguments are those of :meth:`~trajflow.ntm.NTM.sample`.

    Returns:
        ``x̂_0`` ``(n, *event)``.
    """
    if tuple(getattr(denoiser, "event_shape", model.event_shape)) != model.event_shape:
        raise ValueError(
            f"sample_with_denoiser expected a denoiser of event shape {model.event_shape}, "
            f"got {tuple(denoiser.event_shape)}"
        )
    u, _ = sample_u_trajectory(model, n, steps, cfg, y, y_mask, temperature, generator, t_min)
    if not getattr(denoiser, "cond_features", 0):
        return denoiser(u[:, 0])
    return denoiser(u[:, 0], y, y_mask)


# --------------------------------------------------------------------------- checkpoints
def save_denoiser(path: str | os.PathLike, denoiser: LearnedDenoiser, step: int = 0) -> Path:
    """Writes a denoiser checkpoint (atomic, checksummed; see :mod:`trajflow.checkpoint`).

    Its :attr:`~LearnedDenoiser.spec` goes into ``config.json`` so :func:`load_denoiser`
    rebuilds it.
    """
    spec = getattr(denoiser, "spec", None)
    if not isinstance(spec, Spec) or spec.name not in DENOISERS:
        raise TypeError(
            f"save_denoiser expected a registered denoiser with a .spec (see DENOISERS), "
            f"got {type(denoiser).__name__}"
        )
    extra = {"denoiser": spec.model_dump(mode="json")}
    return save_checkpoint(path, denoiser, None, step=step, extra=extra, rng=False)


def load_denoiser(
    path: str | os.PathLike, device: str | torch.device | None = None
) -> LearnedDenoiser:
    """Rebuilds the denoiser saved by :func:`save_denoiser` and loads its weights.

    Raises:
        FileNotFoundError, CheckpointError: As :func:`~trajflow.checkpoint.load_checkpoint`.
        ValueError: If the checkpoint holds no denoiser spec.
    """
    saved = read_checkpoint_config(path).get("extra", {}).get("denoiser")
    if saved is None:
        raise ValueError(f"{path} holds no denoiser (no 'denoiser' entry in its extra state)")
    denoiser = DENOISERS.build(Spec.model_validate(saved))
    return load_checkpoint(path, model=denoiser, device=device)[0]
