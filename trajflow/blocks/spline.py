"""Rational-quadratic spline coupling (Neural Spline Flows, Durkan et al. 2019).

The math is kept apart from the module: :func:`spline_knots` turns unconstrained
parameters into knots, :func:`rational_quadratic_spline` evaluates the monotone spline
(and its inverse) given knots. Outside ``[-bound, bound]`` the map is the identity
(linear tails), and the boundary derivatives are exactly 1 so the map is C¹.

Numerics: no boolean indexing (``torch.where`` over clamped inputs), so values and
gradients stay finite for any finite input and the code compiles with
``torch.compile(fullgraph=True)``; the inverse uses the cancellation-free quadratic root.

Example:
    >>> import torch
    >>> widths, heights, derivatives = torch.randn(3, 10, 8).unbind(0)
    >>> knots = spline_knots(widths, heights, derivatives[..., :7], bound=3.0)
    >>> x = 4 * torch.randn(10)
    >>> y, logdet = rational_quadratic_spline(x, *knots)
    >>> x_again, minus_logdet = rational_quadratic_spline(y, *knots, inverse=True)
    >>> torch.allclose(x, x_again, atol=1e-4), torch.allclose(logdet, -minus_logdet, atol=1e-4)
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trajflow.blocks.coupling import Coupling
from trajflow.core import BLOCKS, Context

__all__ = ["SplineCoupling", "SplineKnots", "rational_quadratic_spline", "spline_knots"]


class SplineKnots(NamedTuple):
    """Knots of a monotone spline, each of shape ``(..., K + 1)`` for ``K`` bins."""

    x: Tensor
    y: Tensor
    derivatives: Tensor


def _normalized_knots(raw: Tensor, bound: float, min_bin: float) -> Tensor:
    """Knot positions ``(K + 1, ...)`` from unnormalised bin sizes ``(K, ...)``, bins first.

    Bin ``k`` has the size ``min_bin + (1 - K · min_bin) · softmax(raw)_k`` on ``[0, 1]``,
    and knot ``i`` sits at ``bound · (2 · Σ_{k<i} size_k - 1)``, computed as one affine map
    of the cumulative softmax.
    """
    bins = raw.shape[0]
    cumulative = torch.cumsum(F.softmax(raw, dim=0)[:-1], dim=0)
    index = torch.arange(1, bins, dtype=raw.dtype, device=raw.device)
    offset = (bound * (2 * min_bin * index - 1)).view(-1, *[1] * (raw.dim() - 1))
    interior = torch.add(offset, cumulative, alpha=2 * bound * (1 - min_bin * bins))
    # Pin the ends exactly, so rounding in the cumsum never moves the tails.
    end = interior.new_full((1, *interior.shape[1:]), bound)
    return torch.cat([-end, interior, end], dim=0)


def spline_knots(
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> SplineKnots:
    """Knots from unconstrained parameters (the parameterisation of nflows' linear tails).

    The work runs with the bin axis first in memory: softmax and cumsum over a short last
    axis are slow on CPU. Inputs that are views of a bins-first tensor (``t.movedim(0, -1)``)
    are used without a copy, and the knots returned are such views.

    Args:
        widths: Unnormalised bin widths, ``(..., K)``; a softmax with a floor ``min_bin_width``.
        heights: Unnormalised bin heights, ``(..., K)``.
        derivatives: Unconstrained interior knot derivatives, ``(..., K - 1)``;
            ``min_derivative + softplus(·)``. The two boundary derivatives are 1.
        bound: The spline acts on ``[-bound, bound]``; the identity outside.

    Returns:
        The knots ``(x, y, derivatives)``, each ``(..., K + 1)``.
    """
    bins = widths.shape[-1]
    if heights.shape[-1] != bins or derivatives.shape[-1] != bins - 1:
        raise ValueError(
            f"expected widths and heights (..., K) and derivatives (..., K - 1), got "
            f"{tuple(widths.shape)}, {tuple(heights.shape)}, {tuple(derivatives.shape)}"
        )
    if min_bin_width * bins >= 1 or min_bin_height * bins >= 1:
        raise ValueError(f"minimum bin sizes too large for {bins} bins")
    interior = min_derivative + F.softplus(derivatives.movedim(-1, 0))
    ones = interior.new_ones((1, *interior.shape[1:]))
    knots = (
        _normalized_knots(widths.movedim(-1, 0), bound, min_bin_width),
        _normalized_knots(heights.movedim(-1, 0), bound, min_bin_height),
        torch.cat([ones, interior, ones], dim=0),
    )
    return SplineKnots(*(k.movedim(0, -1) for k in knots))


def rational_quadratic_spline(
    inputs: Tensor,
    knots_x: Tensor,
    knots_y: Tensor,
    knot_derivatives: Tensor,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Evaluates a monotone rational-quadratic spline with identity tails.

    Args:
        inputs: Points, shape ``(...)``.
        knots_x: Increasing x-knots, ``(..., K + 1)``; the first and last give the domain.
        knots_y: Increasing y-knots, ``(..., K + 1)``; same ends as ``knots_x``.
        knot_derivatives: Positive derivatives at the knots, ``(..., K + 1)``.
        inverse: Apply the inverse map instead.

    Returns:
        The outputs and the elementwise ``log|d out / d in|``, both shaped like ``inputs``.
    """
    # Bins first (views): the search and the gathers then run over whole contiguous slices.
    knots_x, knots_y, knot_derivatives = (
        k.movedim(-1, 0) for k in (knots_x, knots_y, knot_derivatives)
    )
    search = knots_y if inverse else knots_x
    lower, upper = search[0], search[-1]
    inside = (inputs >= lower) & (inputs <= upper)
    # Clamp first: the spline branch then never sees a huge input, so neither its value
    # nor its gradient can overflow where torch.where discards it.
    point = torch.minimum(torch.maximum(inputs, lower), upper)

    # Bin of each point: how many interior knots lie at or below it. Counting in uint8 while
    # the count fits (int32 beyond) avoids converting every comparison to int64 first.
    count = torch.uint8 if search.shape[0] <= 256 else torch.int32
    index = (point >= search[1:-1]).sum(dim=0, keepdim=True, dtype=count).long()
    following = index + 1
    x0, x1 = knots_x.gather(0, index)[0], knots_x.gather(0, following)[0]
    y0, y1 = knots_y.gather(0, index)[0], knots_y.gather(0, following)[0]
    d0, d1 = knot_derivatives.gather(0, index)[0], knot_derivatives.gather(0, following)[0]
    width, height = x1 - x0, y1 - y0
    slope = height / width
    curvature = d0 + d1 - 2 * slope

    if inverse:
        offset = point - y0
        a = height * (slope - d0) + offset * curvature
        b = height * d0 - offset * curvature
        c = -slope * offset
        discriminant = (b * b - 4 * a * c).clamp_min(0)
        # Stable root of a z² + b z + c = 0 in [0, 1]: avoids -b + sqrt(...) cancellation.
        xi = (2 * c) / (-b - torch.sqrt(discriminant))
        xi = xi.clamp(0, 1)
        spline = x0 + xi * width
    else:
        xi = ((point - x0) / width).clamp(0, 1)

    xi_sq, xi_1m, rest = xi * xi, xi * (1 - xi), 1 - xi
    denominator = slope + curvature * xi_1m
    numerator = d1 * xi_sq + 2 * slope * xi_1m + d0 * rest * rest
    log_derivative = torch.log((slope / denominator) ** 2 * numerator)

    if inverse:
        return torch.where(inside, spline, inputs), torch.where(inside, -log_derivative, 0.0)
    spline = y0 + height * (slope * xi_sq + d0 * xi_1m) / denominator
    return torch.where(inside, spline, inputs), torch.where(inside, log_derivative, 0.0)


@BLOCKS.register("spline_coupling")
class SplineCoupling(Coupling):
    """Coupling with an elementwise monotone rational-quadratic spline on ``[-bound, bound]``.

    Args:
        features: See :class:`~trajflow.blocks.coupling.Coupling` (also ``context_features``,
            ``hidden_features``, ``time_features``, ``parity``).
        bins: Number of spline bins ``K``.
        bound: Half-width of the spline's domain; identity tails outside.
        min_bin_width: Floor of each bin's width, as a fraction of the domain.
        min_bin_height: Floor of each bin's height.
        min_derivative: Floor of each interior knot derivative.

    Example:
        >>> block = SplineCoupling(features=4, bins=8, bound=3.0, hidden_features=(32,))
        >>> y, logdet = block(torch.randn(16, 4))
        >>> y.shape, logdet.shape
        (torch.Size([16, 4]), torch.Size([16]))
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        hidden_features: Sequence[int] = (64, 64),
        time_features: int = 0,
        parity: bool = False,
        bins: int = 8,
        bound: float = 5.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ):
        if bins < 2:
            raise ValueError(f"spline_coupling needs bins >= 2, got {bins}")
        if bound <= 0:
            raise ValueError(f"spline_coupling needs bound > 0, got {bound}")
        self.bins = bins
        self.bound = float(bound)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative
        self.params_per_feature = 3 * bins - 1
        super().__init__(features, context_features, hidden_features, time_features, parity)

    def reset_identity_bias(self) -> None:
        # softplus(c) = 1 - min_derivative makes every knot derivative 1: with uniform
        # bins (zero logits) the spline is then exactly the identity.
        identity = math.log(math.expm1(1 - self.min_derivative))
        bias = self.conditioner[-1].bias.data.view(self.transformed, self.params_per_feature)
        bias[:, 2 * self.bins :] = identity

    def _run_conditioner(self, inputs: Tensor) -> Tensor:
        # The conditioner's outputs are ordered (feature, parameter); running its last layer
        # with the rows reordered gives the same numbers parameter-major, (3K - 1, n): each
        # parameter is then a contiguous slab of features and the spline math runs over long
        # contiguous rows, with no transposing copy of the (large) output.
        *hidden, last = self.conditioner
        for layer in hidden:
            inputs = layer(inputs)
        shape = (self.transformed, self.params_per_feature)
        weight = last.weight.unflatten(0, shape).transpose(0, 1).flatten(0, 1)
        bias = last.bias.view(shape).t().flatten()
        return F.linear(inputs, weight, bias)

    def knots(self, params: Tensor) -> SplineKnots:
        """Knots from parameter-major conditioner output.

        Args:
            params: Shape ``(..., (3K - 1) · n)``, ordered (parameter, feature): all first
                widths, then all second widths, ..., as :meth:`_run_conditioner` gives them.

        Returns:
            The knots, each ``(..., n, K + 1)``.
        """
        # (3K - 1, ..., n) views: the bins first, each a contiguous run of features.
        params = params.unflatten(-1, (self.params_per_feature, self.transformed)).movedim(-2, 0)
        widths, heights, derivatives = params.split([self.bins, self.bins, self.bins - 1], dim=0)
        return spline_knots(
            widths.movedim(0, -1),
            heights.movedim(0, -1),
            derivatives.movedim(0, -1),
            self.bound,
            self.min_bin_width,
            self.min_bin_height,
            self.min_derivative,
        )

    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)
        knots = self.knots(params.to(dtype))
        return rational_quadratic_spline(x.to(dtype), *knots, inverse=inverse)

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        block = cls(
            features=5,
            bins=6,
            bound=2.5,
            context_features=3,
            hidden_features=(16, 16),
            time_features=8,
        )
        # Mostly inside the bound (2.5), with the last column pushed onto the linear tails.
        x = 1.25 * torch.randn(4, 5, generator=generator)
        x[:, -1] = 3.0 * torch.sign(x[:, -1]) + x[:, -1]
        ctx = Context(
            t=torch.rand(4, generator=generator), cond=torch.randn(4, 3, generator=generator)
        )
        return block, x, ctx
