"""Sample-quality metrics between point clouds, and the bits/dim conversion.

Both distances compare two samples ``x`` ``(N, D)`` and ``y`` ``(M, D)`` that may have
different sizes, and return a Python float (computed in float64):

- :func:`sliced_wasserstein`: the mean, over random unit directions, of the exact 1-D
  Wasserstein-1 distance between the projected samples. It is in the units of the data, so
  for two Gaussians differing by a mean shift it is of the order of the shift.
- :func:`energy_distance`: the squared energy distance ``2E|X-Y| - E|X-X'| - E|Y-Y'|``, zero
  iff the distributions are equal, with unbiased within-sample terms.
- :func:`kde_cross_entropy`: the mean negative log density of ``x`` under a Gaussian kernel
  density estimate built on ``y``. Both distances above are dominated by global moments
  (a mean shift); this one sees local structure: ``kde_cross_entropy(samples, data)`` is
  low when samples lie where the data are (precision), ``kde_cross_entropy(data, samples)``
  when the samples cover the data (recall).

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(2000, 2, generator=g), torch.randn(3000, 2, generator=g)
    >>> sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(0)) < 0.1
    True
    >>> sliced_wasserstein(x, y + 1.0) > 0.5
    True
    >>> abs(energy_distance(x, y)) < 0.02
    True
    >>> round(bits_per_dim(2 * math.log(2), dims=2), 6)
    1.0
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["bits_per_dim", "energy_distance", "kde_cross_entropy", "sliced_wasserstein"]


def _point_clouds(x: Tensor, y: Tensor, minimum: int = 1) -> tuple[Tensor, Tensor]:
    """Validates two samples ``(N, D)`` and ``(M, D)`` and returns them in float64."""
    clouds = []
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, Tensor):
            raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(
                f"expected {name} to be a (points, features) tensor, got shape {tuple(value.shape)}"
            )
        if value.shape[0] < minimum or value.shape[1] < 1:
            raise ValueError(
                f"expected {name} to hold at least {minimum} point(s) of at least one feature, "
                f"got shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"expected {name} to hold real numbers, got dtype {value.dtype}")
        clouds.append(value.detach().to(torch.float64))
    if clouds[0].shape[1] != clouds[1].shape[1]:
        raise ValueError(
            f"x and y must have the same number of features, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if not (torch.isfinite(clouds[0]).all() and torch.isfinite(clouds[1]).all()):
        raise ValueError("x and y must be finite (found NaN or inf)")
    y_cloud = clouds[1].to(clouds[0].device)
    return clouds[0], y_cloud


def _quantile_grid(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Where the empirical quantile functions of ``n`` and ``m`` points are both constant.

    The quantile function of ``n`` sorted points steps at ``i / n``. Merging the steps of both
    samples cuts ``(0, 1]`` into intervals on which both are constant, so integrating
    ``|F⁻¹ - G⁻¹|`` over them is exact. Returns the interval widths and, per interval, the
    index of the sorted point of each sample (taken at the interval's midpoint, which is
    never a step, so no rounding ambiguity).
    """
    steps = torch.cat(
        [
            torch.arange(1, n + 1, dtype=torch.float64, device=device) / n,
            torch.arange(1, m + 1, dtype=torch.float64, device=device) / m,
        ]
    ).sort()[0]
    left = torch.cat([steps.new_zeros(1), steps[:-1]])
    widths = steps - left
    middle = 0.5 * (left + steps)
    index_x = torch.clamp((middle * n).floor().long(), max=n - 1)
    index_y = torch.clamp((middle * m).floor().long(), max=m - 1)
    return widths, index_x, index_y


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    projections: int = 256,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> float:
    """Sliced Wasserstein-1 distance between two samples, of possibly different sizes.

    Draws ``projections`` directions uniformly on the unit sphere, projects both samples on
    each, and averages the exact 1-D ``W1 = ∫₀¹ |F⁻¹(u) - G⁻¹(u)| du`` between the empirical
    quantile functions. For 1-D data every direction is ``±1`` and the result is the exact W1.

    Args:
        x: Sample ``(N, D)``.
        y: Sample ``(M, D)``.
        projections: Number of random directions.
        generator: Seeds the directions (drawn on the CPU, so results match across devices).
        chunk_size: Directions processed at once; bounds memory to ``O((N + M) · chunk_size)``.

    Returns:
        The distance, a non-negative float in the units of the data.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real tensor.
        ValueError: For shapes other than ``(N, D)`` / ``(M, D)``, empty or non-finite samples,
            or a non-positive ``projections`` or ``chunk_size``.

    Example:
        >>> x = torch.zeros(5, 1)
        >>> sliced_wasserstein(x, x + 3.0)
        3.0
    """
    if projections < 1 or chunk_size < 1:
        raise ValueError(
            f"expected positive projections and chunk_size, got {projections} and {chunk_size}"
        )
    x, y = _point_clouds(x, y)
    directions = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = (directions / directions.norm(dim=0, keepdim=True)).to(x.device)
    widths, index_x, index_y = _quantile_grid(x.shape[0], y.shape[0], x.device)
    total = x.new_zeros(())
    for chunk in directions.split(chunk_size, dim=1):
        quantiles_x = (x @ chunk).sort(dim=0)[0][index_x]
        quantiles_y = (y @ chunk).sort(dim=0)[0][index_y]
        total = total + (widths[:, None] * (quantiles_x - quantiles_y).abs()).sum()
    return float(total / projections)


def _mean_distance(a: Tensor, b: Tensor, exclude_diagonal: bool, chunk_size: int) -> Tensor:
    """Mean Euclidean distance over pairs, block by block so memory stays ``O(chunk · M)``."""
    total = a.new_zeros(())
    for start in range(0, a.shape[0], chunk_size):
        total = total + torch.cdist(a[start : start + chunk_size], b).sum()
    # The diagonal of a sample against itself is zero: dropping it only changes the count.
    pairs = a.shape[0] * (b.shape[0] - 1) if exclude_diagonal else a.shape[0] * b.shape[0]
    return total / pairs


def energy_distance(
    x: Tensor,
    y: Tensor,
    max_points: int | None = 4096,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> float:
    """Squared energy distance ``2E|X-Y| - E|X-X'| - E|Y-Y'|`` between two samples.

    The within-sample means exclude the zero self-distances (the unbiased U-statistics), so
    two samples of the same distribution give a value scattered around 0 (possibly slightly
    negative). Samples larger than ``max_points`` are subsampled without replacement, and
    distances are computed in blocks of ``chunk_size`` rows, so 20k-point clouds are cheap.

    Args:
        x: Sample ``(N, D)``, ``N >= 2``.
        y: Sample ``(M, D)``, ``M >= 2``.
        max_points: Subsample each sample to at most this many points (``None``: use all;
            the cost is quadratic).
        generator: Seeds the subsampling.
        chunk_size: Rows of the distance matrix computed at once.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real tensor.
        ValueError: For bad shapes, fewer than 2 points, non-finite values, or a
            ``max_points`` or ``chunk_size`` below 2 / 1.

    Example:
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> energy_distance(x, x + 10.0)  # 2·10 - 1 - 1
        18.0
    """
    if max_points is not None and max_points < 2:
        raise ValueError(f"expected max_points >= 2 or None, got {max_points}")
    if chunk_size < 1:
        raise ValueError(f"expected a positive chunk_size, got {chunk_size}")
    x, y = _point_clouds(x, y, minimum=2)
    if max_points is not None:
        if x.shape[0] > max_points:
            x = x[torch.randperm(x.shape[0], generator=generator)[:max_points].to(x.device)]
        if y.shape[0] > max_points:
            y = y[torch.randperm(y.shape[0], generator=generator)[:max_points].to(y.device)]
    between = _mean_distance(x, y, exclude_diagonal=False, chunk_size=chunk_size)
    within_x = _mean_distance(x, x, exclude_diagonal=True, chunk_size=chunk_size)
    within_y = _mean_distance(y, y, exclude_diagonal=True, chunk_size=chunk_size)
    return float(2 * between - within_x - within_y)


def kde_cross_entropy(
    x: Tensor, y: Tensor, bandwidth: float = 0.05, chunk_size: int = 1024
) -> float:
    """Mean ``-log p̂_y(x)`` in nats, ``p̂_y`` a Gaussian kernel density estimate on ``y``.

    ``p̂_y(x) = (1/M) Σ_j N(x; y_j, h² I)``. Not symmetric: the first argument is scored under
    the density of the second. Two samples of one distribution give about the cross-entropy
    of the smoothed density; compare models only at the same ``bandwidth`` and reference.

    Args:
        x: Points to score ``(N, D)``.
        y: Reference sample ``(M, D)`` the density is built on.
        bandwidth: Kernel standard deviation ``h`` (in the units of the data), ``> 0``.
        chunk_size: Rows of the distance matrix computed at once.

    Raises:
        TypeError, ValueError: As :func:`sliced_wasserstein` for bad samples; a
            non-positive ``bandwidth`` or ``chunk_size``.

    Example:
        >>> y = torch.zeros(1, 1)
        >>> round(kde_cross_entropy(torch.zeros(1, 1), y, bandwidth=1.0), 4)  # -log N(0; 0, 1)
        0.9189
    """
    if not isinstance(bandwidth, numbers.Real) or not math.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"expected a finite bandwidth > 0, got {bandwidth!r}")
    if chunk_size < 1:
        raise ValueError(f"expected a positive chunk_size, got {chunk_size}")
    x, y = _point_clouds(x, y)
    dims = x.shape[1]
    log_norm = math.log(y.shape[0]) + 0.5 * dims * math.log(2 * math.pi * bandwidth**2)
    total = x.new_zeros(())
    for start in range(0, x.shape[0], chunk_size):
        squared = torch.cdist(x[start : start + chunk_size], y).square()
        total = total - (torch.logsumexp(-squared / (2 * bandwidth**2), dim=1) - log_norm).sum()
    return float(total / x.shape[0])


def bits_per_dim(nll_nats: float | Tensor, dims: int) -> float | Tensor:
    """Converts a negative log-likelihood in nats (per sample) to bits per dimension.

    ``bits/dim = nll / (dims · ln 2)``; state which variable the likelihood is about (see
    :meth:`trajflow.ntm.NTM.data_bound`) whenever you report it.

    Args:
        nll_nats: NLL in nats, a number or a tensor of per-sample values.
        dims: Number of data dimensions ``D`` (positive).

    Returns:
        The same type as ``nll_nats``.

    Raises:
        ValueError: If ``dims`` is not a positive integer.
        TypeError: If ``nll_nats`` is neither a number nor a tensor.

    Example:
        >>> bits_per_dim(torch.tensor([0.0, 4 * math.log(2)]), dims=4)
        tensor([0., 1.])
    """
    if isinstance(dims, bool) or not isinstance(dims, numbers.Integral) or dims < 1:
        raise ValueError(f"expected dims to be a positive integer, got {dims!r}")
    if isinstance(nll_nats, bool) or not isinstance(nll_nats, (numbers.Real, Tensor)):
        raise TypeError(f"expected nll_nats to be a number or a tensor, got {type(nll_nats)}")
    return nll_nats / (int(dims) * math.log(2))
