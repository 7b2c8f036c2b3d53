"""Image blocks on ``(B, C, H, W)``: squeeze (space-to-depth), 1x1 convolution and ActNorm.

The 1x1 convolution and ActNorm are :class:`~trajflow.blocks.linear.LULinear` and
:class:`~trajflow.blocks.linear.ActNorm` applied to every pixel: each image is viewed as
``H·W`` tokens of ``C`` channels, so the log-det is ``H·W`` times the per-pixel one. The
convolutional coupling lives in :mod:`trajflow.blocks.image_coupling`, Glow's multi-scale
composition of them in :mod:`trajflow.blocks.multiscale`.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS, Sequential
    >>> flow = Sequential.from_specs([
    ...     {"name": "squeeze"},
    ...     {"name": "image_actnorm", "kwargs": {"channels": 12}},
    ...     {"name": "conv1x1", "kwargs": {"channels": 12}},
    ... ])
    >>> z, logdet = flow(torch.randn(2, 3, 8, 8))
    >>> z.shape, logdet.shape
    (torch.Size([2, 12, 4, 4]), torch.Size([2]))
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from trajflow.blocks.linear import ActNorm, LULinear
from trajflow.core import BLOCKS, Block, Context, logdet_dtype

__all__ = [
    "Conv1x1",
    "ImageActNorm",
    "Squeeze",
    "check_image",
    "depth_to_space",
    "space_to_depth",
]


def check_image(owner: str, x: Tensor, channels: int | None = None) -> None:
    """Validates an image batch: floating dtype, shape ``(B, C, H, W)``, ``C == channels``.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If it is not of rank 4 or has the wrong number of channels.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{owner} expected shape (B, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{owner} expected shape (B, C, H, W) with C={channels}, got {tuple(x.shape)}"
        )


def space_to_depth(x: Tensor, factor: int = 2) -> Tensor:
    """Moves each ``f × f`` patch into the channels: ``(B, C, H, W) → (B, C·f², H/f, W/f)``.

    Output channel ``c·f² + i·f + j`` holds pixel ``(i, j)`` of each patch of input channel
    ``c`` (Glow's order).

    Example:
        >>> space_to_depth(torch.arange(16.0).reshape(1, 1, 4, 4))[0, :, 0, 0]
        tensor([0., 1., 4., 5.])
    """
    return rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=factor, j=factor)


def depth_to_space(y: Tensor, factor: int = 2) -> Tensor:
    """The inverse of :func:`space_to_depth`: ``(B, C·f², H, W) → (B, C, H·f, W·f)``."""
    return rearrange(y, "b (c i j) h w -> b c (h i) (w j)", i=factor, j=factor)


def _pixels(x: Tensor) -> Tensor:
    """``(B, C, H, W) → (B, H·W, C)``: every pixel a token."""
    return rearrange(x, "b c h w -> b (h w) c")


def _image(tokens: Tensor, like: Tensor) -> Tensor:
    return rearrange(tokens, "b (h w) c -> b c h w", h=like.shape[2])


@BLOCKS.register("squeeze")
class Squeeze(Block):
    """Space-to-depth: ``(B, C, H, W) → (B, C·f², H/f, W/f)``, a permutation with log-det 0.

    Args:
        factor: Side of the square patches moved into the channels.

    Example:
        >>> y, logdet = Squeeze()(torch.randn(2, 3, 4, 6))
        >>> y.shape, logdet.tolist()
        (torch.Size([2, 12, 2, 3]), [0.0, 0.0])
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"squeeze expected an integer factor >= 2, got {factor!r}")
        self.factor = factor

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_image("squeeze", x)
        height, width = x.shape[2:]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"squeeze with factor {self.factor} expected H and W divisible by {self.factor}, "
                f"got shape {tuple(x.shape)}"
            )
        return space_to_depth(x, self.factor), x.new_zeros(x.shape[0], dtype=logdet_dtype(x))

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_image("squeeze.inverse", y)
        if y.shape[1] % self.factor**2:
            raise ValueError(
                f"squeeze.inverse with factor {self.factor} expected C divisible by "
                f"{self.factor**2}, got shape {tuple(y.shape)}"
            )
        return depth_to_space(y, self.factor), y.new_zeros(y.shape[0], dtype=logdet_dtype(y))

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        return cls(), torch.randn(3, 2, 4, 6, generator=generator), None


@BLOCKS.register("conv1x1")
class Conv1x1(LULinear):
    """Glow's invertible 1x1 convolution: :class:`~trajflow.blocks.linear.LULinear` per pixel.

    ``y[:, :, h, w] = W x[:, :, h, w]`` with ``W = P L U``: ``P`` a fixed permutation,
    ``L`` unit lower-triangular, ``U`` upper-triangular with diagonal
    ``sign · exp(log_diagonal)``, so ``log|det| = H·W·Σ log_diagonal``; the inverse is two
    triangular solves. Starts at a seeded random rotation.

    Args:
        channels: Channels ``C``.
        seed: Seed of the initial rotation.

    Example:
        >>> conv = Conv1x1(channels=4)
        >>> x = torch.randn(2, 4, 3, 5)
        >>> y, logdet = conv(x)
        >>> weight = conv.weight()[:, :, None, None]
        >>> torch.allclose(y, torch.nn.functional.conv2d(x, weight), atol=1e-6)
        True
    """

    def __init__(self, channels: int, seed: int = 0):
        if channels < 1:
            raise ValueError(f"conv1x1 needs channels >= 1, got {channels}")
        super().__init__(channels, seed)

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_image("conv1x1", x, self.features)
        y, logdet = super().forward(_pixels(x), ctx)
        return _image(y, x), logdet

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_image("conv1x1.inverse", y, self.features)
        x, logdet = super().inverse(_pixels(y), ctx)
        return _image(x, y), logdet

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        return cls(channels=3, seed=1), torch.randn(3, 3, 4, 3, generator=generator), None


@BLOCKS.register("image_actnorm")
class ImageActNorm(ActNorm):
    """Per-channel ``y = (x + bias) · exp(log_scale)`` on images, with data-dependent init.

    :class:`~trajflow.blocks.linear.ActNorm` applied to every pixel: the first forward call
    sets ``bias`` and ``log_scale`` so that its batch has zero mean and unit variance per
    channel, pooled over the batch and all pixels (and all ranks under ``torch.distributed``).
    ``log|det| = H·W·Σ log_scale``.

    Args:
        channels: Channels ``C``.
        eps: Added to the standard deviation.

    Example:
        >>> norm = ImageActNorm(channels=3)
        >>> z, _ = norm(2 + 3 * torch.randn(8, 3, 4, 4))
        >>> z.mean((0, 2, 3)).abs().max().item() < 1e-5
        True
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        if channels < 1:
            raise ValueError(f"image_actnorm needs channels >= 1, got {channels}")
        super().__init__(channels, eps)

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_image("image_actnorm", x, self.features)
        y, logdet = super().forward(_pixels(x), ctx)
        return _image(y, x), logdet

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        check_image("image_actnorm.inverse", y, self.features)
        x, logdet = super().inverse(_pixels(y), ctx)
        return _image(x, y), logdet

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        block = cls(channels=3)
        x = torch.randn(4, 3, 4, 2, generator=generator)
        block(x)  # initialised, so later perturbations are not overwritten
        return block, x, None
