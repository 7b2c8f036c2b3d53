"""Convolutional affine coupling on images ``(B, C, H, W)``, with checkerboard or channel masks.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS
    >>> block = BLOCKS.build("conv_affine_coupling", channels=3, mask="checkerboard")
    >>> x = torch.randn(2, 3, 8, 8)
    >>> z, logdet = block(x)
    >>> torch.equal(z, x), logdet.abs().max().item()  # identity at initialisation
    (True, 0.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajflow.blocks.coupling import soft_clamp
from trajflow.blocks.image import check_image
from trajflow.core import BLOCKS, Block, Context, logdet_dtype, sum_except_batch
from trajflow.nn import ContextEncoder

__all__ = ["ConvAffineCoupling", "ConvConditioner", "checkerboard"]

MASKS = ("checkerboard", "channel")


def checkerboard(height: int, width: int, parity: bool = False, device=None) -> Tensor:
    """The kept pixels of a checkerboard coupling: ``(h + w) % 2 == parity``, shape ``(H, W)``.

    Example:
        >>> checkerboard(2, 3).int()
        tensor([[1, 0, 1],
                [0, 1, 0]], dtype=torch.int32)
    """
    rows = torch.arange(height, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    return (rows + columns) % 2 == int(parity)


class ConvConditioner(nn.Module):
    """``3x3 conv → SiLU → 1x1 conv → SiLU → 3x3 conv``, the last one zero-initialised.

    A per-sample conditioning vector, if given, is projected to the hidden channels and added
    to every pixel after the first convolution.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        hidden_channels: Channels of the two hidden layers.
        context_features: Width of the conditioning vector; 0 for none.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, context_features: int = 0
    ):
        super().__init__()
        self.first = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.context = nn.Linear(context_features, hidden_channels) if context_features else None
        self.middle = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.last = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        # Zero output: a new coupling is the identity.
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        h = self.first(x)
        if self.context is not None and condition is not None:
            h = h + self.context(condition.to(h.dtype))[:, :, None, None].to(h.dtype)
        h = F.silu(self.middle(F.silu(h)))
        return self.last(h)


@BLOCKS.register("conv_affine_coupling")
class ConvAffineCoupling(Block):
    """RealNVP's convolutional affine coupling with a soft-clamped log-scale.

    The pixels (``mask="checkerboard"``) or channels (``mask="channel"``) are split into a
    kept part ``x_a``, which passes through, and a transformed part ``x_b``:

        (t, s_raw) = CNN(x_a, ctx)
        s   = scale_bound · tanh(s_raw / scale_bound)
        y_b = x_b · exp(s) + t           log|det| = Σ s   (over the transformed entries)

    Checkerboard: the kept pixels are those with ``(h + w) % 2 == parity``, all channels; the
    CNN sees the image with the transformed pixels zeroed and outputs ``(t, s)`` for every
    pixel, of which the transformed ones are used. Channel: the first ``⌊C/2⌋`` channels are
    kept (the last ones with ``parity=True``). Alternate ``parity`` in successive blocks. The
    context (``ctx.cond`` and the sinusoidal embedding of ``ctx.t``, plus ``ctx.steps`` if
    given) is projected to the hidden channels and added after the first convolution. The
    last convolution is zero-initialised, so a new block is the identity. The affine maths
    and the log-det run in float32 or wider, also under bf16 autocast.

    Args:
        channels: Channels ``C``.
        mask: ``"checkerboard"`` or ``"channel"``.
        parity: Swap the kept and transformed parts.
        hidden_channels: Hidden channels of the conditioner CNN.
        context_features: Width of ``ctx.cond``; 0 for none.
        time_features: Width of the time embedding of ``ctx.t``; 0 for none.
        scale_bound: Soft bound of the log-scale.

    Example:
        >>> block = ConvAffineCoupling(channels=4, mask="channel", time_features=16)
        >>> ctx = Context(t=torch.rand(2))
        >>> y, logdet = block(torch.randn(2, 4, 8, 8), ctx)
        >>> y.shape, logdet.dtype
        (torch.Size([2, 4, 8, 8]), torch.float32)
    """

    def __init__(
        self,
        channels: int,
        mask: str = "checkerboard",
        parity: bool = False,
        hidden_channels: int = 64,
        context_features: int = 0,
        time_features: int = 0,
        scale_bound: float = 3.0,
    ):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(
                f"conv_affine_coupling expected mask 'checkerboard' or 'channel', got {mask!r}"
            )
        if channels < (2 if mask == "channel" else 1):
            raise ValueError(
                f"conv_affine_coupling with mask={mask!r} needs channels >= "
                f"{2 if mask == 'channel' else 1}, got {channels}"
            )
        if hidden_channels < 1:
            raise ValueError(
                f"conv_affine_coupling needs hidden_channels >= 1, got {hidden_channels}"
            )
        if scale_bound <= 0:
            raise ValueError(f"scale_bound must be positive, got {scale_bound}")
        self.channels, self.mask, self.parity = channels, mask, parity
        self.scale_bound = scale_bound
        if mask == "channel":
            kept = channels // 2
            self.split = (channels - kept, kept) if parity else (kept, channels - kept)
            inputs, transformed = kept, channels - kept
        else:
            inputs = transformed = channels
        self.context = ContextEncoder(context_features, time_features)
        self.conditional = self.context.features > 0
        self.conditioner = ConvConditioner(
            inputs, 2 * transformed, hidden_channels, self.context.features
        )

    def _shift_and_log_scale(
        self, kept: Tensor, ctx: Context | None, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        condition = self.context(ctx, "conv_affine_coupling", batch=kept.shape[0])
        shift, raw_scale = self.conditioner(kept, condition).to(dtype).chunk(2, dim=1)
        return shift, soft_clamp(raw_scale, self.scale_bound)

    @staticmethod
    def _affine(x: Tensor, shift: Tensor, log_scale: Tensor, inverse: bool) -> Tensor:
        x = x.to(shift.dtype)
        return (x - shift) * torch.exp(-log_scale) if inverse else x * torch.exp(log_scale) + shift

    def _couple(self, x: Tensor, ctx: Context | None, inverse: bool) -> tuple[Tensor, Tensor]:
        check_image("conv_affine_coupling", x, self.channels)
        # Affine arithmetic in float32 or wider, even under bf16 autocast.
        dtype = torch.promote_types(x.dtype, torch.float32)
        if self.mask == "channel":
            first, second = x.split(self.split, dim=1)
            kept, moving = (second, first) if self.parity else (first, second)
            shift, log_scale = self._shift_and_log_scale(kept, ctx, dtype)
            moved = self._affine(moving, shift, log_scale, inverse).to(x.dtype)
            out = torch.cat([moved, kept] if self.parity else [kept, moved], dim=1)
        else:
            keep = checkerboard(x.shape[2], x.shape[3], self.parity, x.device)
            # torch.where, not x · mask: NaN · 0 is NaN, and the CNN must not see x_b at all.
            shift, log_scale = self._shift_and_log_scale(torch.where(keep, x, 0.0), ctx, dtype)
            out = torch.where(keep, x, self._affine(x, shift, log_scale, inverse).to(x.dtype))
            log_scale = torch.where(keep, 0.0, log_scale)
        logdet = sum_except_batch(log_scale.to(logdet_dtype(x)))
        return out, -logdet if inverse else logdet

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, ctx, inverse=False)

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(y, ctx, inverse=True)

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        block = cls(
            channels=3, mask="checkerboard", hidden_channels=8, context_features=2, time_features=8
        )
        x = torch.randn(4, 3, 4, 4, generator=generator)
        ctx = Context(
            t=torch.rand(4, generator=generator), cond=torch.randn(4, 2, generator=generator)
        )
        return block, x, ctx
