"""Evaluation without downloads: compositional accuracy, Fréchet distance, bits/dim.

Everything a text-to-image checkpoint is judged by, computed from this package alone:

- **Compositional accuracy** (GenEval-style, :func:`compositional_accuracy`): a
  :class:`~trajflow_t2i.verifier.Verifier` reads each generated image and the reading is
  compared with the prompt's parsed specification (:func:`trajflow_t2i.check.parse_prompt`),
  per category of :data:`CATEGORIES`; reported beside the rule-based check
  (:func:`trajflow_t2i.check.accuracy`), on test prompts and on held-out-combination prompts.
- **Fréchet distance** (:func:`frechet_distance`) between generated and real images in the
  verifier's penultimate feature space (an FID without Inception).
- **Bits/dim** of every likelihood model on one stated variable (:data:`T0`,
  :func:`likelihood_variable`): the NTM's variational bound (:func:`ntm_bits_per_dim`), a
  normalizing flow's exact density (:func:`flow_bits_per_dim`) and flow matching through its
  probability-flow ODE with the exact divergence (:func:`flow_matching_bits_per_dim`).

:func:`run_eval` runs them all on a checkpoint; ``trajflow-t2i eval`` is its command line.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3))
    >>> frechet_distance(a, b) < 0.02, round(frechet_distance(a, b + 1.0))
    (True, 3)
    >>> compositional_accuracy([("count", "red", "circle", 2)], ["two red circles"])["count"]
    {'accuracy': 1.0, 'n': 1}
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from trajflow.checks import check_count
from trajflow.core import Context
from trajflow.flow import NormalizingFlow, standard_normal_log_prob
from trajflow.flow_matching import FlowMatching
from trajflow_t2i.check import PromptSpec, accuracy, check_images, parse_prompt, spec_of
from trajflow_t2i.data import (
    COLOURS,
    DIGIT_WORDS,
    SHAPES,
    DigitScene,
    Scene,
    dequantize,
    make_split,
    split_words,
)

__all__ = [
    "CATEGORIES",
    "T0",
    "Likelihood",
    "compositional_accuracy",
    "digit_of_prompt",
    "flow_bits_per_dim",
    "flow_matching_bits_per_dim",
    "frechet_distance",
    "gaussian_frechet_distance",
    "likelihood_variable",
    "model_bits_per_dim",
    "ntm_bits_per_dim",
    "ode_log_density",
    "run_eval",
    "score_images",
    "summary",
    "write_json",
]

#: The ``t_0`` of the variable every likelihood is stated on (method notes §10).
T0 = 1e-3

# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def _features(name: str, value) -> np.ndarray:
    array = value.detach().cpu().double().numpy() if isinstance(value, Tensor) else value
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(
            f"expected {name} to be features (N >= 2, D >= 1), got shape {tuple(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"expected finite {name} (found NaN or inf)")
    return array


def gaussian_frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """``‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^{1/2})``: the squared 2-Wasserstein distance of two
    Gaussians.

    The matrix square root comes from ``scipy.linalg.sqrtm``. Estimated covariances of few
    samples are singular, and then the root can pick up round-off that is imaginary or not
    finite: in that case ``eps`` is added to both diagonals and the root taken again (as in
    the reference FID code), and only the real part is kept. The result is clipped at 0.

    Example:
        >>> gaussian_frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
        4.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, float)), np.atleast_2d(np.asarray(cov2, float))
    dims = mu1.shape[0]
    if mu2.shape != (dims,) or cov1.shape != (dims, dims) or cov2.shape != (dims, dims):
        raise ValueError(
            f"expected means (D,) and covariances (D, D) of one D, got {mu1.shape}, "
            f"{cov1.shape}, {mu2.shape}, {cov2.shape}"
        )
    root = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all() or np.abs(np.imag(root)).max(initial=0) > 1e-3:
        offset = eps * np.eye(dims)
        root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    root = np.real(root)
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root)
    return float(max(distance, 0.0))


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between two feature samples ``(N, D)`` and ``(M, D)`` (array or tensor).

    Fits a Gaussian to each (mean, unbiased covariance) and returns
    :func:`gaussian_frechet_distance`. With few samples it is biased upwards (two samples of
    one distribution are not at 0): compare models at the same sample size, and beside
    the distance between two real samples of that size.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features of different widths: {a.shape} and {b.shape}")
    return gaussian_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps
    )


# ---------------------------------------------------------------------------------------------
# Compositional accuracy
# ---------------------------------------------------------------------------------------------

#: GenEval-style categories, and which prompts each one judges:
#:
#: - ``single object`` (single-object prompts): exactly one object, of the prompted shape;
#: - ``colour`` (single and count prompts): the objects have the prompted shape and colour;
#: - ``count`` (count prompts): the prompted number of objects of the prompted shape;
#: - ``two objects`` (relation prompts): both prompted objects (colour and shape), in any place;
#: - ``position`` (relation prompts): both objects, in the prompted relation.
#:
#: ``digit`` (digits prompts) is the right class.
CATEGORIES: tuple[str, ...] = ("single object", "colour", "count", "two objects", "position")


def digit_of_prompt(prompt: str) -> int:
    """The digit a ``digits`` caption asks for.

    Example:
        >>> digit_of_prompt("a handwritten seven")
        7
    """
    if not isinstance(prompt, str):
        raise TypeError(f"digit_of_prompt expected a str, got {type(prompt).__name__}")
    found = [DIGIT_WORDS.index(w) for w in split_words(prompt) if w in DIGIT_WORDS]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one digit word ({', '.join(DIGIT_WORDS)}) in {prompt!r}, "
            f"got {len(found)}"
        )
    return found[0]


_SHAPES_WORDS = frozenset({*COLOURS, *SHAPES, *(f"{shape}s" for shape in SHAPES)})


def _spec(prompt) -> PromptSpec | int:
    if isinstance(prompt, PromptSpec):
        return prompt
    if isinstance(prompt, Scene):
        return spec_of(prompt)
    if isinstance(prompt, DigitScene):
        return prompt.label
    if isinstance(prompt, int) and not isinstance(prompt, bool) and 0 <= prompt <= 9:
        return prompt  # a digit label
    if isinstance(prompt, str):
        # Shapes prompts name a colour or a shape; digits captions never do.
        if _SHAPES_WORDS.isdisjoint(split_words(prompt)):
            return digit_of_prompt(prompt)
        return parse_prompt(prompt)
    raise TypeError(
        f"expected a prompt str, Scene, DigitScene, PromptSpec or digit 0-9, got {prompt!r:.60}"
    )


def _judge(reading, spec: PromptSpec | int) -> dict[str, bool]:
    """Which categories an image that the verifier read as ``reading`` satisfies."""
    if isinstance(spec, int):
        return {"digit": reading == spec, "exact": reading == spec}
    wanted = spec.canonical()
    if not isinstance(reading, tuple):
        raise TypeError(f"a shapes prompt needs a shapes reading, got {reading!r}")
    verdict = {"exact": reading == wanted}
    if spec.kind == "relation":
        pair = reading[0] == "relation"
        verdict["two objects"] = pair and {reading[1], reading[3]} == set(spec.objects)
        verdict["position"] = verdict["exact"]
        return verdict
    colour, shape = spec.objects[0]
    same = reading[0] == "count" and reading[2] == shape
    verdict["colour"] = same and reading[1] == colour
    if spec.kind == "single":
        verdict["single object"] = same and reading[3] == 1
    else:
        verdict["count"] = same and reading[3] == spec.count
    return verdict


def compositional_accuracy(readings: Sequence, prompts: Sequence) -> dict[str, Any]:
    """GenEval-style accuracy of verifier readings against their prompts.

    Args:
        readings: What the verifier saw in each image (:meth:`Verifier.describe`).
        prompts: The prompt of each image: captions, scenes or specs.

    Returns:
        ``{category: {"accuracy", "n"}}`` for each category judged at least once, ``overall``
        (the mean over those categories, as GenEval reports), ``exact`` (the image is exactly
        what was asked, ``{"accuracy", "n"}``) and ``by_kind`` (exact per prompt kind).
    """
    if len(readings) != len(prompts):
        raise ValueError(f"got {len(readings)} readings but {len(prompts)} prompts")
    specs = [_spec(p) for p in prompts]
    verdicts = [_judge(r, s) for r, s in zip(readings, specs, strict=True)]
    table: dict[str, Any] = {}
    for category in (*CATEGORIES, "digit"):
        values = [v[category] for v in verdicts if category in v]
        if values:
            table[category] = {"accuracy": round(sum(values) / len(values), 4), "n": len(values)}
    judged = [table[c]["accuracy"] for c in table]
    table["overall"] = round(sum(judged) / len(judged), 4) if judged else None
    exact = [v["exact"] for v in verdicts]
    table["exact"] = {
        "accuracy": round(sum(exact) / len(exact), 4) if exact else None,
        "n": len(exact),
    }
    kinds = [s.kind if isinstance(s, PromptSpec) else "digit" for s in specs]
    table["by_kind"] = {
        kind: round(
            sum(e for e, k in zip(exact, kinds, strict=True) if k == kind) / kinds.count(kind), 4
        )
        for kind in sorted(set(kinds))
    }
    return table


def _derangement(kinds: Sequence[str], generator: torch.Generator) -> list[int]:
    """Each index mapped to another of the same kind (a cyclic shift of a random order)."""
    order = list(range(len(kinds)))
    for kind in sorted(set(kinds)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
        for j, index in enumerate(shuffled):
            order[index] = shuffled[(j + 1) % len(shuffled)]
    return order


# ---------------------------------------------------------------------------------------------
# Likelihoods on one variable
# ---------------------------------------------------------------------------------------------


@dataclass
class Likelihood:
    """Per-image log-density of the stated variable and its bits/dim.

    Attributes:
        log_likelihood: ``log p(x_{t_0})`` in nats ``(B,)`` (a lower bound for the NTM).
        bits_per_dim: ``(-log p(x_{t_0}) - D log(2/K)) / (D ln 2)`` ``(B,)``.
        variable: The variable in words (``t_0``, ``K``, the dequantisation).
        method: How ``log p`` was computed.
    """

    log_likelihood: Tensor
    bits_per_dim: Tensor
    variable: str
    method: str

    def summary(self) -> dict[str, Any]:
        """Mean bits/dim, its standard error, and the statements, for a JSON report."""
        bpd = self.bits_per_dim.double()
        error = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else None
        return {
            "bits_per_dim": round(float(bpd.mean()), 4),
            "standard_error": None if error is None else round(error, 4),
            "images": len(bpd),
            "variable": self.variable,
            "method": self.method,
        }


def _variable(t0: float, levels: int) -> str:
    return f"x_t0 = (1 - t0) x + t0 ε, t0 = {t0:g}, K = {levels} uniform dequantisation to [-1, 1]"


def _check_t0(owner: str, t0: float) -> float:
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not 0 < t0 < 1:
        raise ValueError(f"{owner} expected t0 in (0, 1), got {t0!r}")
    return float(t0)


def likelihood_variable(
    images: Tensor, levels: int, t0: float = T0, generator: torch.Generator | None = None
) -> Tensor:
    """The variable of every likelihood: ``x_{t_0} = (1 - t_0) x + t_0 ε``.

    ``x = 2(k + u)/K - 1`` is the uniformly dequantised image, ``u ~ U[0, 1)``, ``ε ~ N(0, I)``.

    Args:
        images: Integer levels ``k`` in ``0..K-1``, any shape ``(B, ...)``.
        levels: ``K``.
        t0: The noise level (default :data:`T0`).
        generator: Seeds ``u`` and ``ε``.

    Example:
        >>> k = torch.tensor([[0, 16]], dtype=torch.uint8)
        >>> x = likelihood_variable(k, 17, generator=torch.Generator().manual_seed(0))
        >>> bool((x[0, 0] < -0.87) & (x[0, 1] > 0.87))
        True
    """
    t0 = _check_t0("likelihood_variable", t0)
    x = dequantize(images, generator, levels)
    device = x.device if generator is None else generator.device  # where the generator draws
    noise = torch.randn(x.shape, generator=generator, device=device).to(x.device)
    return (1 - t0) * x + t0 * noise


def _likelihood(log_p: Tensor, dims: int, levels: int, t0: float, method: str) -> Likelihood:
    nats = -log_p.double() - dims * math.log(2 / levels)
    return Likelihood(log_p.double(), nats / (dims * math.log(2)), _variable(t0, levels), method)


def _identity(x: Tensor) -> Tensor:
    return x


def flow_bits_per_dim(
    flow: NormalizingFlow,
    images: Tensor,
    levels: int,
    t0: float = T0,
    to_event: Callable[[Tensor], Tensor] = _identity,
    ctx: Context | None = None,
    generator: torch.Generator | None = None,
) -> Likelihood:
    """Exact bits/dim of a normalizing flow (e.g. a stack of TarFlow blocks) on ``x_{t_0}``.

    Args:
        flow: The flow; ``flow.log_prob(to_event(x_t0), ctx)`` must be the exact log-density.
        images: Integer levels ``(B, C, H, W)``.
        levels: ``K``.
        t0: See :func:`likelihood_variable`.
        to_event: Images to the flow's event shape; must preserve volume (a reshape or a
            permutation such as :func:`trajflow_t2i.model.patchify`), so densities agree.
        ctx: The flow's condition (e.g. text tokens), batch ``B``.
        generator: Seeds the variable.
    """
    x = likelihood_variable(images, levels, t0, generator)
    parameter = next(flow.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        log_p = flow.log_prob(to_event(x), ctx)
    return _likelihood(log_p, x[0].numel(), levels, t0, "normalizing flow, exact density")


def _velocity_and_divergence(
    velocity: Callable[..., Tensor], x: Tensor, t: Tensor, conditions: tuple, chunk: int
) -> tuple[Tensor, Tensor]:
    """``v(x, t)`` and its exact divergence ``tr ∂v/∂x``, ``D`` backward rows at a time.

    Each sample is repeated ``D`` times; replica ``i`` back-propagates only its output ``i``,
    so one backward pass over the repeated batch gives every diagonal entry of every
    sample's Jacobian (samples must not interact, as in eval mode).
    """
    batch, dims = x.shape[0], x[0].numel()
    velocities, divergences = [], []
    per_chunk = max(1, chunk // dims)
    for start in range(0, batch, per_chunk):
        rows = slice(start, start + per_chunk)
        n = x[rows].shape[0]
        with torch.enable_grad():
            repeated = x[rows].detach().repeat_interleave(dims, 0).requires_grad_(True)
            extra = [None if c is None else c[rows].repeat_interleave(dims, 0) for c in conditions]
            v = velocity(repeated, t[rows].repeat_interleave(dims), *extra)
            pick = torch.eye(dims, dtype=v.dtype, device=v.device).repeat(n, 1)
            (grad,) = torch.autograd.grad((v.reshape(n * dims, dims) * pick).sum(), repeated)
        diagonal = (grad.reshape(n * dims, dims) * pick).sum(1)
        divergences.append(diagonal.reshape(n, dims).double().sum(1))
        velocities.append(v.detach().reshape(n, dims, *x.shape[1:])[:, 0])
    return torch.cat(velocities), torch.cat(divergences)


def ode_log_density(
    velocity: Callable[..., Tensor],
    x: Tensor,
    t0: float = T0,
    steps: int = 32,
    grid: str = "log",
    conditions: Sequence[Tensor | None] = (),
    chunk: int = 4096,
) -> Tensor:
    """``log p_{t_0}(x)`` of the probability-flow ODE ``dx/dt = v(x, t)`` with a ``N(0, I)`` end.

    ``log p_{t_0}(x_{t_0}) = log N(x_1; 0, I) + ∫_{t_0}^1 div v(x_t, t) dt`` along the ODE
    solution from ``x_{t_0} = x`` to ``t = 1``. The state and the integral are advanced
    together by classical fourth-order Runge–Kutta with ``steps`` fixed steps, on a grid
    geometric in ``t`` (``"log"``: ``t_k = t_0 (1/t_0)^{k/steps}``, fine near ``t_0`` where
    the field changes on the scale of ``t``) or uniform (``"uniform"``). The divergence is
    exact (every diagonal entry of the Jacobian by autograd), so there is no trace-estimator
    noise: ``4 · steps`` evaluations of ``v`` on a batch ``D`` times larger.

    Args:
        velocity: ``v(x, t, *conditions)`` for ``x`` ``(B, *event)``, ``t`` ``(B,)``, each
            sample independent of the others.
        x: Points ``(B, *event)``.
        t0: Start time.
        steps: Runge–Kutta steps.
        grid: ``"log"`` or ``"uniform"``.
        conditions: Extra per-sample arguments of ``velocity`` (batch ``B``, or None).
        chunk: Largest repeated batch (samples × D) per pass; bounds memory.

    Returns:
        ``(B,)`` float64 log-densities.

    Example:
        >>> def v(x, t):  # the exact field of data N(0, I): p_t = N(0, ((1-t)² + t²) I)
        ...     t = t[:, None]
        ...     return x * (2 * t - 1) / (1 - 2 * t + 2 * t**2)
        >>> x = torch.zeros(1, 3, dtype=torch.float64)
        >>> expected = -1.5 * math.log(2 * math.pi * ((1 - T0) ** 2 + T0**2))
        >>> abs(ode_log_density(v, x).item() - expected) < 1e-4
        True
    """
    owner = "ode_log_density"
    t0 = _check_t0(owner, t0)
    steps = check_count(owner, "steps", steps)
    if grid not in ("log", "uniform"):
        raise ValueError(f"{owner} expected grid 'log' or 'uniform', got {grid!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or not len(x):
        raise ValueError(f"{owner} expected a non-empty floating batch (B, *event), got {x!r:.80}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{owner} expected finite x (found NaN or inf)")
    conditions = tuple(conditions)
    for c in conditions:
        if c is not None and len(c) != len(x):
            raise ValueError(f"{owner}: conditions need batch {len(x)}, got {len(c)}")
    if grid == "log":
        times = (t0 * (1 / t0) ** (torch.arange(steps + 1, dtype=torch.float64) / steps)).tolist()
    else:
        times = torch.linspace(t0, 1.0, steps + 1, dtype=torch.float64).tolist()
    times[-1] = 1.0
    batch = len(x)

    def field(state: Tensor, t: float) -> tuple[Tensor, Tensor]:
        t_batch = torch.full((batch,), t, dtype=state.dtype, device=state.device)
        return _velocity_and_divergence(velocity, state, t_batch, conditions, chunk)

    state = x.detach()
    integral = torch.zeros(batch, dtype=torch.float64, device=x.device)
    for t, s in itertools.pairwise(times):
        h = s - t
        k1, d1 = field(state, t)
        k2, d2 = field(state + 0.5 * h * k1, t + 0.5 * h)
        k3, d3 = field(state + 0.5 * h * k2, t + 0.5 * h)
        k4, d4 = field(state + h * k3, s)
        state = state + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        integral = integral + (h / 6) * (d1 + 2 * d2 + 2 * d3 + d4)
    return standard_normal_log_prob(state).double() + integral


def flow_matching_bits_per_dim(
    fm: FlowMatching,
    images: Tensor,
    levels: int,
    t0: float = T0,
    steps: int = 32,
    to_event: Callable[[Tensor], Tensor] = _identity,
    y: Tensor | None = None,
    y_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    grid: str = "log",
) -> Likelihood:
    """Bits/dim of a flow-matching model on ``x_{t_0}`` through its probability-flow ODE.

    :func:`ode_log_density` with the model's (conditional, unguided) velocity: RK4 with
    ``steps`` steps on a geometric grid from ``t_0`` to 1, exact divergence.

    Args:
        fm: The model (its network in eval mode).
        images, levels, t0, to_event, generator: As for :func:`flow_bits_per_dim`.
        steps, grid: Of the integrator.
        y, y_mask: The condition of every image (batch ``B``), e.g. text tokens and mask.
    """
    x = likelihood_variable(images, levels, t0, generator)
    device, dtype = fm._device_dtype()
    event = to_event(x.to(device, dtype))

    def velocity(state, t, cond=None, mask=None):
        return fm.velocity(state, t, cond, mask)

    log_p = ode_log_density(velocity, event, t0, steps, grid, (y, y_mask))
    method = (
        f"flow matching, probability-flow ODE: RK4, {steps} {grid}-spaced steps from t0 to 1, "
        "exact divergence"
    )
    return _likelihood(log_p, x[0].numel(), levels, t0, method)


def ntm_bits_per_dim(
    model,
    images: Tensor,
    captions: Sequence[str],
    steps: int = 4,
    t0: float = T0,
    generator: torch.Generator | None = None,
) -> Likelihood:
    """The NTM's variational bound (method notes §4) as bits/dim on ``x_{t_0}``.

    Args:
        model: A :class:`~trajflow_t2i.model.TextToImage` of the NTM stage, identity
            autoencoder (a pixel likelihood).
        images: Integer levels ``(B, C, H, W)``.
        captions: The caption of each image.
        steps: ``T`` of the trajectory the bound runs on.
        t0, generator: As for :func:`flow_bits_per_dim`.
    """
    t0 = _check_t0("ntm_bits_per_dim", t0)
    bound = model.bits_per_dim(images, captions, steps=steps, t0=t0, generator=generator)
    dims = images[0].numel()
    method = f"NTM variational bound on the trajectory, T = {steps}, one forward trajectory"
    return _likelihood(bound.log_likelihood, dims, model.levels, t0, method)


def model_bits_per_dim(
    model,
    images: Tensor,
    captions: Sequence[str],
    steps: int = 4,
    t0: float = T0,
    ode_steps: int = 32,
    generator: torch.Generator | None = None,
) -> Likelihood:
    """Bits/dim of a :class:`~trajflow_t2i.model.TextToImage` of either stage on ``x_{t_0}``.

    The NTM stage gives its bound (:func:`ntm_bits_per_dim`); the FM stage its exact ODE
    density (:func:`flow_matching_bits_per_dim`). Only the identity autoencoder gives a pixel
    likelihood; others raise ValueError.
    """
    if model.config.model.autoencoder.name != "identity":
        raise ValueError(
            "bits/dim needs a pixel-space model (identity autoencoder), got the "
            f"{model.config.model.autoencoder.name!r} autoencoder"
        )
    if model.stage == "ntm":
        return ntm_bits_per_dim(model, images, captions, steps, t0, generator)
    with torch.no_grad():
        tokens, mask, _ = model.encode_text(captions)
    return flow_matching_bits_per_dim(
        model.generator,
        images,
        model.levels,
        t0=t0,
        steps=ode_steps,
        to_event=model.to_tokens,
        y=tokens,
        y_mask=mask,
        generator=generator,
    )


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Writes ``report`` as JSON to ``path`` atomically (a temporary file, then renamed)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(json.dumps(report, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _generate(model, prompts, steps, cfg, seed, batch=64) -> Tensor:
    return torch.cat(
        [
            model.generate(
                prompts[i : i + batch],
                steps=steps,
                cfg=cfg,
                generator=torch.Generator().manual_seed(seed + i),
            )
            for i in range(0, len(prompts), batch)
        ]
    ).cpu()


def score_images(
    verifier,
    images: Tensor,
    prompts: Sequence,
    real: Tensor,
    reference: Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """How well generated ``images`` follow their ``prompts`` and match ``real`` images.

    Args:
        verifier: A :class:`~trajflow_t2i.verifier.Verifier` for the images' dataset.
        images: One generated image per prompt, floats in ``[-1, 1]`` or uint8 levels.
        prompts: Captions (or scenes, specs) the images were generated for.
        real: Real images of the same distribution (e.g. those of the same captions).
        reference: Another real sample of the size of ``images``: its distance to ``real``
            is reported as ``frechet_distance_real``, the floor at this sample size.
        seed: Seeds the prompt derangement of the chance levels.

    Returns:
        ``verifier`` (:func:`compositional_accuracy`) and ``verifier_chance`` (the same with
        each image judged against another prompt of its kind); for shapes ``rule_check`` and
        ``rule_check_chance`` (:func:`trajflow_t2i.check.accuracy` per kind);
        ``frechet_distance`` in the verifier's feature space, and ``frechet_distance_real``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    specs = [_spec(p) for p in prompts]
    kinds = [s.kind if isinstance(s, PromptSpec) else "digit" for s in specs]
    order = _derangement(kinds, torch.Generator().manual_seed(seed))
    mismatched = [specs[i] for i in order]
    readings = verifier.describe(images)
    real_features = verifier.embed(real)
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "verifier": compositional_accuracy(readings, specs),
        "verifier_chance": compositional_accuracy(readings, mismatched),
        "frechet_distance": round(frechet_distance(verifier.embed(images), real_features), 4),
    }
    if reference is not None:
        distance = frechet_distance(verifier.embed(reference), real_features)
        report["frechet_distance_real"] = round(distance, 4)
    if verifier.dataset == "shapes":
        report["rule_check"] = accuracy(check_images(images, specs), kinds)
        report["rule_check_chance"] = accuracy(check_images(images, mismatched), kinds)
    return report


def _split_report(model, verifier, split, n, steps, cfg, seed) -> dict[str, Any]:
    config = model.config.data
    data = make_split(config.name, split, n=n, seed=seed + 1, size=config.image_size)
    images = _generate(model, data.captions, steps, cfg, seed)
    # Digits have one test split: the reference sample comes from the training images.
    other_split = "train" if config.name == "digits" else split
    other = make_split(config.name, other_split, n=n, seed=seed + 2, size=config.image_size)
    return score_images(verifier, images, data.captions, data.images, other.images, seed)


def run_eval(
    model,
    n: int = 256,
    steps: int = 4,
    cfg: float = 3.0,
    seed: int = 0,
    verifier=None,
    verifier_report: dict | None = None,
    bpd_images: int = 128,
    ode_steps: int = 32,
    max_ode_dims: int = 256,
) -> dict[str, Any]:
    """Evaluates a :class:`~trajflow_t2i.model.TextToImage` on its dataset.

    For each split (``test``, and ``heldout`` for shapes) ``n`` captions are drawn, one image
    generated per caption, and reported: the verifier's compositional accuracy and its chance
    level (each image judged against another caption of its kind), the rule-based check and
    its chance level (shapes), and the Fréchet distance to the real images of those captions
    in the verifier's feature space, beside the distance between two real samples of size
    ``n``. Then bits/dim on ``bpd_images`` test images (:func:`model_bits_per_dim`; the FM
    stage only when ``D <= max_ode_dims``, its exact divergence costs ``D`` backward rows).

    Args:
        model: The model (eval mode).
        n: Prompts per split (digits test has 297 at most).
        steps: Sampling steps (and the ``T`` of the NTM bound).
        cfg: Guidance weight.
        seed: Seeds captions, sampling and the likelihood variable.
        verifier: A trained :class:`~trajflow_t2i.verifier.Verifier` for the model's data
            (default: one trained now, deterministically).
        verifier_report: Its report (accuracies on renders), copied into the result.
        bpd_images: Test images of the bits/dim estimate (0: skip).
        ode_steps: RK4 steps of the FM-stage likelihood.
        max_ode_dims: Largest ``D`` for which the FM-stage likelihood is computed.
    """
    from trajflow_t2i.verifier import verifier_for

    config = model.config.data
    n = check_count("run_eval", "n", n)
    if config.name == "digits":
        n = min(n, 297)
    began = time.perf_counter()
    if verifier is None:
        verifier, verifier_report = verifier_for(config.name, config.image_size)
    if (verifier.dataset, verifier.image_size) != (config.name, config.image_size):
        raise ValueError(
            f"the verifier reads {verifier.dataset} at {verifier.image_size}px but the model "
            f"makes {config.name} at {config.image_size}px"
        )
    report: dict[str, Any] = {
        "dataset": config.name,
        "image_size": config.image_size,
        "stage": model.stage,
        "sampling": {"steps": steps, "cfg": cfg, "seed": seed, "prompts_per_split": n},
        "verifier": verifier_report or {},
        "splits": {},
    }
    splits = ("test", "heldout") if config.name == "shapes" else ("test",)
    for split in splits:
        report["splits"][split] = _split_report(model, verifier, split, n, steps, cfg, seed)
    report["bits_per_dim"] = None
    dims = config.channels * config.image_size**2
    if bpd_images and (model.stage == "ntm" or dims <= max_ode_dims):
        size = config.image_size
        test = make_split(config.name, "test", n=min(bpd_images, n), seed=seed + 3, size=size)
        likelihood = model_bits_per_dim(
            model,
            test.images,
            test.captions,
            steps=steps,
            ode_steps=ode_steps,
            generator=torch.Generator().manual_seed(seed),
        )
        report["bits_per_dim"] = likelihood.summary()
    elif bpd_images:
        report["bits_per_dim_skipped"] = (
            f"the FM stage's exact ODE likelihood at D = {dims} > {max_ode_dims} is too slow here"
        )
    report["seconds"] = round(time.perf_counter() - began, 1)
    return report


def summary(report: dict[str, Any]) -> str:
    """A few plain lines of a :func:`run_eval` report for the terminal."""
    sampling = report["sampling"]
    lines = [
        f"{report['dataset']} {report['image_size']}px, stage {report['stage']}, "
        f"{sampling['steps']} steps, cfg {sampling['cfg']}, "
        f"{sampling['prompts_per_split']} prompts per split"
    ]
    for split, part in report["splits"].items():
        verifier, chance = part["verifier"], part["verifier_chance"]
        categories = ", ".join(
            f"{name} {verifier[name]['accuracy']:.2f}"
            for name in (*CATEGORIES, "digit")
            if name in verifier
        )
        line = (
            f"{split}: verifier exact {verifier['exact']['accuracy']:.2f} "
            f"(chance {chance['exact']['accuracy']:.2f}); {categories}"
        )
        if "rule_check" in part:
            line += f"; rule check ok {part['rule_check']['all']['ok']:.2f}"
        line += (
            f"; Fréchet distance {part['frechet_distance']:.3f} "
            f"(real vs real {part['frechet_distance_real']:.3f})"
        )
        lines.append(line)
    bpd = report.get("bits_per_dim")
    if bpd:
        lines.append(f"bits/dim {bpd['bits_per_dim']} on {bpd['images']} test images")
        lines.append(f"  variable: {bpd['variable']}; {bpd['method']}")
    elif report.get("bits_per_dim_skipped"):
        lines.append(f"bits/dim skipped: {report['bits_per_dim_skipped']}")
    return "\n".join(lines)
