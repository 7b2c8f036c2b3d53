"""Linear blocks acting on the last dimension: LU linear (1x1 conv), ActNorm, permutations.

On token sequences ``(B, L, C)`` these act on every token alike, which is exactly Glow's
invertible 1x1 convolution and ActNorm once images are tokens; the log-determinant is then
``L`` times the per-token one.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS
    >>> conv = BLOCKS.build("lu_linear", features=3)
    >>> x = torch.randn(2, 10, 3)
    >>> y, logdet = conv(x)
    >>> torch.allclose(conv.inverse(y)[0], x, atol=1e-5)
    True
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trajflow.core import BLOCKS, Block, Context, check_features, logdet_dtype

__all__ = ["ActNorm", "FixedPermutation", "LULinear", "Reverse"]


def _tokens_per_sample(x: Tensor) -> int:
    return 1 if x.dim() == 2 else x.shape[1]


def _constant_logdet(x: Tensor, per_token: Tensor) -> Tensor:
    value = per_token.to(logdet_dtype(x)) * _tokens_per_sample(x)
    return value.expand(x.shape[0])


@BLOCKS.register("lu_linear")
class LULinear(Block):
    """Invertible linear map ``y = W x`` per token, ``W = P L U`` (Glow's 1x1 convolution).

    ``P`` is a fixed permutation, ``L`` unit lower-triangular, ``U`` upper-triangular with
    diagonal ``sign · exp(log_diagonal)``, so ``log|det W| = Σ log_diagonal`` costs nothing
    and the inverse is two triangular solves. Initialised at a seeded random rotation.

    Args:
        features: Channels ``C`` (or vector features ``D``).
        seed: Seed of the initial rotation.
    """

    def __init__(self, features: int, seed: int = 0):
        super().__init__()
        if features < 1:
            raise ValueError(f"lu_linear needs features >= 1, got {features}")
        self.features = features
        generator = torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", torch.sign(diagonal))
        self.lower = nn.Parameter(torch.tril(lower, -1))
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_diagonal = nn.Parameter(torch.log(diagonal.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_diagonal))
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix ``W = P L U``."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_features("lu_linear", x, self.features)
        y = x @ self.weight().to(x.dtype).T
        return y, _constant_logdet(x, self.log_diagonal.sum())

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_features("lu_linear", y, self.features)
        lower, upper = self._factors()
        columns = y.reshape(-1, self.features).T.to(lower.dtype)  # (C, N): solve W x = y
        columns = self.permutation.T @ columns
        columns = torch.linalg.solve_triangular(lower, columns, upper=False, unitriangular=True)
        columns = torch.linalg.solve_triangular(upper, columns, upper=True)
        x = columns.T.reshape(y.shape).to(y.dtype)
        return x, -_constant_logdet(y, self.log_diagonal.sum())

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        return cls(features=4, seed=1), torch.randn(3, 5, 4, generator=generator), None


@BLOCKS.register("actnorm")
class ActNorm(Block):
    """Per-channel affine ``y = (x + bias) · exp(log_scale)`` with data-dependent initialisation.

    The first forward call (data → latent) sets ``bias`` and ``log_scale`` so its batch has
    zero mean and unit variance per channel. Whether that happened is the buffer
    ``initialized``, saved in the state_dict: a loaded model is never re-initialised. Under
    ``torch.distributed`` the statistics are all-reduced, so every rank gets identical
    parameters.

    Args:
        features: Channels ``C`` (or vector features ``D``).
        eps: Added to the standard deviation.

    Example:
        >>> norm = ActNorm(features=2)
        >>> z, _ = norm(3 + 5 * torch.randn(1000, 2))
        >>> z.mean(0).abs().max().item() < 1e-5, bool(norm.initialized)
        (True, True)
    """

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.features = features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Sets the parameters from the per-channel statistics of ``x`` (all ranks pooled)."""
        flat = x.reshape(-1, self.features).double()
        stats = torch.stack([flat.sum(0), (flat**2).sum(0)])
        count = torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=x.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(count)
        mean = stats[0] / count
        variance = (stats[1] / count - mean**2).clamp_min(0)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(variance.sqrt() + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_features("actnorm", x, self.features)
        if not self.initialized:
            self.initialize(x)
        y = (x + self.bias.to(x.dtype)) * torch.exp(self.log_scale).to(x.dtype)
        return y, _constant_logdet(x, self.log_scale.sum())

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_features("actnorm", y, self.features)
        x = y * torch.exp(-self.log_scale).to(y.dtype) - self.bias.to(y.dtype)
        return x, -_constant_logdet(y, self.log_scale.sum())

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        block = cls(features=3)
        x = torch.randn(6, 4, 3, generator=generator)
        block(x)  # initialised, so later perturbations are not overwritten
        return block, x, None


class _Permutation(Block):
    """Shared code of permutation blocks: a fixed index along a dimension, log-det 0."""

    def __init__(self, dim: int = -1):
        super().__init__()
        if dim not in (1, -1):
            raise ValueError(f"permutations act on dim -1 (features) or 1 (tokens), got {dim}")
        self.dim = dim

    @abstractmethod
    def _index(self, size: int, device: torch.device) -> Tensor:
        """The forward permutation of a dimension of length ``size``."""

    def _permute(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        check_features(type(self).__name__, x, None)
        if self.dim == 1 and x.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}(dim=1) permutes tokens and expected (B, L, C), "
                f"got {tuple(x.shape)}"
            )
        index = self._index(x.shape[self.dim], x.device)
        if inverse:
            index = torch.argsort(index)
        return x.index_select(self.dim, index), x.new_zeros(x.shape[0], dtype=logdet_dtype(x))

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self._permute(x, inverse=False)

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self._permute(y, inverse=True)


@BLOCKS.register("reverse")
class Reverse(_Permutation):
    """Reverses the order of the features (``dim=-1``) or of the tokens (``dim=1``).

    Example:
        >>> Reverse()(torch.tensor([[1.0, 2.0, 3.0]]))[0]
        tensor([[3., 2., 1.]])
    """

    def _index(self, size: int, device: torch.device) -> Tensor:
        return torch.arange(size - 1, -1, -1, device=device)

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        return cls(), torch.randn(3, 5, generator=generator), None


@BLOCKS.register("fixed_permutation")
class FixedPermutation(_Permutation):
    """A seeded random permutation of the features, stored as a buffer.

    Args:
        features: Size of the permuted dimension.
        seed: Seed of the permutation; the buffer is what is saved and reloaded.
        dim: -1 to permute features, 1 to permute tokens.

    Example:
        >>> perm = FixedPermutation(features=4, seed=0)
        >>> sorted(perm.index.tolist())
        [0, 1, 2, 3]
    """

    def __init__(self, features: int, seed: int = 0, dim: int = -1):
        super().__init__(dim)
        self.features = features
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("index", torch.randperm(features, generator=generator))

    def _index(self, size: int, device: torch.device) -> Tensor:
        if size != self.features:
            raise ValueError(
                f"fixed_permutation expected size {self.features} along dim {self.dim}, got {size}"
            )
        return self.index.to(device)

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        return cls(features=5, seed=3), torch.randn(3, 5, generator=generator), None
