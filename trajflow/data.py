"""Toy 2-D datasets, generated on the fly (nothing is downloaded), in a registry.

Every dataset is a function ``(n, generator) -> Tensor (n, 2)``, roughly standardised
(zero mean, unit scale), registered in :data:`DATASETS`. Register your own with the
decorator and every benchmark and CLI accepts it by name.

Example:
    >>> import torch
    >>> from trajflow.data import DATASETS, sample_dataset
    >>> sample_dataset("two_moons", 5, seed=0).shape
    torch.Size([5, 2])
    >>> @DATASETS.register("ring")
    ... def ring(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    ...     angle = 2 * torch.pi * torch.rand(n, generator=generator)
    ...     return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    >>> sample_dataset("ring", 3).shape
    torch.Size([3, 2])
    >>> _ = DATASETS._entries.pop("ring")  # keep the doctest from leaking a registration
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from trajflow.registry import Registry

__all__ = ["DATASETS", "Dataset", "sample_dataset"]

Dataset = Callable[[int, "torch.Generator | None"], Tensor]

#: Registered toy datasets.
DATASETS: Registry[Dataset] = Registry("dataset")


def sample_dataset(name: str, n: int, seed: int | None = None) -> Tensor:
    """Draws ``n`` float32 points of a registered dataset, reproducibly when ``seed`` is given.

    Raises:
        KeyError: For an unknown dataset (the message lists the known ones).
        ValueError: If ``n`` is not positive or the dataset returns the wrong shape.
    """
    if n < 1:
        raise ValueError(f"expected a positive number of samples, got {n}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    points = DATASETS.get(name)(n, generator)
    if points.shape != (n, 2) or not points.is_floating_point():
        raise ValueError(
            f"dataset {name!r} must return a float (n, 2) tensor, got {tuple(points.shape)}"
        )
    return points.float()


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator)


@DATASETS.register("checkerboard")
def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform on the 8 dark squares of a 4×4 checkerboard on ``[-2, 2]²``."""
    x = 4 * _uniform(n, generator) - 2
    offset = torch.randint(0, 2, (n,), generator=generator).float() * 2
    y = _uniform(n, generator) - offset + (torch.floor(x) % 2)
    return torch.stack([x, y], dim=1) * 0.9


@DATASETS.register("eight_gaussians")
def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Eight small Gaussians evenly spaced on a circle of radius 2."""
    index = torch.randint(0, 8, (n,), generator=generator).float()
    angle = 2 * math.pi * index / 8
    centres = 2 * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + 0.15 * torch.randn(n, 2, generator=generator)


@DATASETS.register("two_moons")
def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved half circles with a little Gaussian noise."""
    angle = math.pi * _uniform(n, generator)
    upper = torch.randint(0, 2, (n,), generator=generator).bool()
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.6
    return points + 0.08 * torch.randn(n, 2, generator=generator)


@DATASETS.register("pinwheel")
def pinwheel(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Five curved arms (the classic pinwheel of Johnson et al. 2016)."""
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = torch.randint(0, arms, (n,), generator=generator).float()
    radial = 1 + radial_std * torch.randn(n, generator=generator)
    tangential = tangential_std * torch.randn(n, generator=generator)
    angle = 2 * math.pi * arm / arms + rate * torch.exp(radial)
    cos, sin = angle.cos(), angle.sin()
    return 2 * torch.stack(
        [cos * radial - sin * tangential, sin * radial + cos * tangential], dim=1
    )


@DATASETS.register("spirals")
def spirals(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaved spirals."""
    radius = torch.sqrt(_uniform(n, generator)) * 3 * math.pi
    sign = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    x = sign * -torch.cos(radius) * radius
    y = sign * torch.sin(radius) * radius
    return torch.stack([x, y], dim=1) / 3 + 0.1 * torch.randn(n, 2, generator=generator)
