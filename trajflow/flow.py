"""A normalizing flow: a block (data → latent) on top of a standard Gaussian base.

Example:
    >>> import torch
    >>> from trajflow import NormalizingFlow, Sequential
    >>> flow = NormalizingFlow(Sequential.from_specs([
    ...     {"name": "spline_coupling", "kwargs": {"features": 2, "hidden_features": [16]}},
    ...     {"name": "reverse"},
    ... ]), shape=(2,))
    >>> x = flow.sample(4, generator=torch.Generator().manual_seed(0))
    >>> flow.log_prob(x).shape
    torch.Size([4])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trajflow.checks import check_count, check_number
from trajflow.core import Block, Context, check_features

__all__ = ["NormalizingFlow", "standard_normal_log_prob"]


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over every non-batch dimension, in float32 or wider."""
    z = z.reshape(z.shape[0], -1)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return -0.5 * (z.square().sum(dim=1) + z.shape[1] * math.log(2 * math.pi))


class NormalizingFlow(nn.Module):
    """Exact density ``log p(x) = log N(f(x); 0, I) + log|det ∂f/∂x|`` and sampling ``f⁻¹(z)``.

    Args:
        transform: The data → latent block (often a :class:`~trajflow.core.Sequential`).
        shape: Per-sample shape of the data, e.g. ``(2,)`` or ``(L, C)``; inferred at the
            first ``log_prob`` call when omitted.
    """

    def __init__(self, transform: Block, shape: tuple[int, ...] | None = None):
        super().__init__()
        self.transform = transform
        self.shape = None if shape is None else tuple(shape)

    def log_prob(self, x: Tensor, ctx: Context | None = None) -> Tensor:
        """Exact log-density of each sample, shape ``(B,)``."""
        check_features("NormalizingFlow", x, None)
        if self.shape is None:
            self.shape = tuple(x.shape[1:])
        z, logdet = self.transform(x, ctx)
        return standard_normal_log_prob(z) + logdet

    def sample(
        self,
        n: int,
        ctx: Context | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Draws ``n`` samples (``ctx``, if given, must have batch size ``n``).

        Raises:
            TypeError, ValueError: For ``n`` not an integer ``>= 1``, a temperature that is
                not a finite number ``>= 0``, or no known ``shape`` yet.
        """
        n = check_count("NormalizingFlow.sample", "n", n)
        temperature = check_number("NormalizingFlow.sample", "temperature", temperature, low=0.0)
        if self.shape is None:
            raise ValueError("NormalizingFlow.sample needs `shape` (or one log_prob call) first")
        parameter = next(self.transform.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        z = temperature * torch.randn((n, *self.shape), generator=generator, dtype=dtype)
        return self.transform.inverse(z.to(device), ctx)[0]
