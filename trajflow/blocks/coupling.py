"""Coupling blocks: half of the features pass through and parameterise a transform of the rest.

Works on vectors ``(B, D)`` and on token sequences ``(B, L, C)`` (split over channels,
the conditioner applied per token). The conditioner's last layer is zero-initialised so a
new block is the identity.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS
    >>> block = BLOCKS.build("affine_coupling", features=4, hidden_features=(32, 32))
    >>> x = torch.randn(10, 4)
    >>> z, logdet = block(x)
    >>> torch.equal(z, x), logdet.abs().max().item()  # identity at initialisation
    (True, 0.0)
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from trajflow.core import BLOCKS, Block, Context, check_features, logdet_dtype, sum_except_batch
from trajflow.nn import MLP, ContextEncoder

__all__ = ["AdditiveCoupling", "AffineCoupling", "Coupling", "soft_clamp"]


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """Smoothly limits ``x`` to ``(-bound, bound)``: ``bound · tanh(x / bound)``."""
    return bound * torch.tanh(x / bound)


class Coupling(Block):
    """Base of coupling blocks: splits the last dimension into a kept and a transformed half.

    The first ``features // 2`` features are kept (the last ones with ``parity=True``) and,
    with the encoded context, fed to an MLP conditioner that outputs
    :attr:`params_per_feature` numbers per transformed feature. Subclasses implement the
    elementwise transform in :meth:`transform`.

    Args:
        features: Size of the last input dimension (``D`` of vectors, ``C`` of tokens).
        context_features: Width of ``ctx.cond``; 0 for none.
        hidden_features: Hidden widths of the conditioner MLP.
        time_features: Width of the sinusoidal embedding of ``ctx.t``; 0 for none.
        parity: Transform the first half instead of the second.
    """

    #: Conditioner outputs per transformed feature (the transform's parameters).
    params_per_feature: int = 1

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        hidden_features: Sequence[int] = (64, 64),
        time_features: int = 0,
        parity: bool = False,
    ):
        super().__init__()
        if features < 2:
            raise ValueError(f"{type(self).__name__} needs features >= 2, got {features}")
        self.features = features
        self.parity = parity
        kept = features // 2
        self.split = (features - kept, kept) if parity else (kept, features - kept)
        self.kept, self.transformed = (self.split[1], self.split[0]) if parity else self.split
        self.context = ContextEncoder(context_features, time_features)
        self.conditional = self.context.features > 0
        self.conditioner = MLP(
            self.kept + self.context.features,
            self.transformed * self.params_per_feature,
            tuple(hidden_features),
            zero_init=True,
        )
        self.reset_identity_bias()

    def reset_identity_bias(self) -> None:
        """Sets the conditioner's output bias so that a zero weight gives the identity."""

    @abstractmethod
    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Elementwise transform of the transformed half.

        Args:
            x: Transformed half, shape ``(..., n)``.
            params: Conditioner output, shape ``(..., n * params_per_feature)``.
            inverse: Which direction to apply.

        Returns:
            The output and the elementwise log-derivative, both shaped like ``x``.
        """

    def _parameters_for(self, kept: Tensor, ctx: Context | None) -> Tensor:
        condition = self.context(ctx, type(self).__name__, batch=kept.shape[0])
        if condition is not None:
            if kept.dim() == 3:  # broadcast the per-sample context over tokens
                condition = condition[:, None, :].expand(-1, kept.shape[1], -1)
            kept = torch.cat([kept, condition.to(kept.dtype)], dim=-1)
        return self._run_conditioner(kept)

    def _run_conditioner(self, inputs: Tensor) -> Tensor:
        """The conditioner's output for the kept features (and context), as
        :meth:`transform` receives it; subclasses may lay it out differently."""
        return self.conditioner(inputs)

    def _couple(self, x: Tensor, ctx: Context | None, inverse: bool) -> tuple[Tensor, Tensor]:
        check_features(type(self).__name__, x, self.features)
        first, second = x.split(self.split, dim=-1)
        kept, moving = (second, first) if self.parity else (first, second)
        params = self._parameters_for(kept, ctx)
        moved, log_derivative = self.transform(moving, params, inverse)
        moved = moved.to(x.dtype)
        out = torch.cat([moved, kept] if self.parity else [kept, moved], dim=-1)
        return out, sum_except_batch(log_derivative.to(logdet_dtype(x)))

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, ctx, inverse=False)

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(y, ctx, inverse=True)

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        block = cls(features=5, context_features=3, hidden_features=(16, 16), time_features=8)
        x = torch.randn(4, 5, generator=generator)
        ctx = Context(
            t=torch.rand(4, generator=generator), cond=torch.randn(4, 3, generator=generator)
        )
        return block, x, ctx


@BLOCKS.register("additive_coupling")
class AdditiveCoupling(Coupling):
    """Volume-preserving coupling ``y_b = x_b + shift(x_a)`` (NICE).

    Example:
        >>> block = AdditiveCoupling(features=6, hidden_features=(16,))
        >>> block(torch.randn(2, 3, 6))[0].shape  # token sequences too
        torch.Size([2, 3, 6])
    """

    params_per_feature = 1

    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        shift = params.to(x.dtype)
        return (x - shift if inverse else x + shift), torch.zeros_like(x)


@BLOCKS.register("affine_coupling")
class AffineCoupling(Coupling):
    """Affine coupling ``y_b = x_b · exp(a(x_a)) + b(x_a)`` with a soft-clamped log-scale.

    Args:
        features: See :class:`Coupling` (also ``context_features``, ``hidden_features``,
            ``time_features``, ``parity``).
        scale_bound: The log-scale is ``scale_bound · tanh(raw / scale_bound)``.

    Example:
        >>> block = AffineCoupling(features=4, context_features=2, hidden_features=(16,))
        >>> ctx = Context(cond=torch.randn(3, 2))
        >>> y, logdet = block(torch.randn(3, 4), ctx)
        >>> logdet.shape
        torch.Size([3])
    """

    params_per_feature = 2

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        hidden_features: Sequence[int] = (64, 64),
        time_features: int = 0,
        parity: bool = False,
        scale_bound: float = 3.0,
    ):
        if scale_bound <= 0:
            raise ValueError(f"scale_bound must be positive, got {scale_bound}")
        self.scale_bound = scale_bound
        super().__init__(features, context_features, hidden_features, time_features, parity)

    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # Affine arithmetic in float32 or wider, even under bf16 autocast.
        dtype = torch.promote_types(x.dtype, torch.float32)
        shift, raw_scale = params.to(dtype).chunk(2, dim=-1)
        log_scale = soft_clamp(raw_scale, self.scale_bound)
        x = x.to(dtype)
        if inverse:
            return ((x - shift) * torch.exp(-log_scale)), -log_scale
        return x * torch.exp(log_scale) + shift, log_scale
