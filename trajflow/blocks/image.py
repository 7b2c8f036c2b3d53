"""Image blocks on ``(B, C, H, W)``: squeeze, 1x1 convolution, ActNorm and Glow's multi-scale flow.

The 1x1 convolution and ActNorm are :class:`~trajflow.blocks.linear.LULinear` and
:class:`~trajflow.blocks.linear.ActNorm` applied to every pixel: each image is viewed as
``H·W`` tokens of ``C`` channels, so the log-det is ``H·W`` times the per-pixel one. The
convolutional coupling lives in :mod:`trajflow.blocks.image_coupling`.

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

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from trajflow.blocks.linear import ActNorm, LULinear
from trajflow.core import BLOCKS, Block, Context, Sequential, logdet_dtype
from trajflow.registry import Spec

__all__ = [
    "Conv1x1",
    "ImageActNorm",
    "MultiScale",
    "Squeeze",
    "check_image",
    "depth_to_space",
    "glow_levels",
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


def _build_with_channels(spec: Spec | Mapping[str, Any] | str, channels: int, level: int) -> Block:
    """Builds a block of a multiscale level, filling in ``channels`` if the block takes it."""
    if isinstance(spec, str):
        spec = Spec(name=spec)
    elif not isinstance(spec, Spec):
        spec = Spec.model_validate(dict(spec))
    entry = BLOCKS.get(spec.name)
    try:
        takes_channels = "channels" in inspect.signature(entry).parameters
    except (TypeError, ValueError):
        takes_channels = False
    if not takes_channels:
        return BLOCKS.build(spec)
    given = spec.kwargs.get("channels", channels)
    if given != channels:
        raise ValueError(
            f"multiscale level {level} has {channels} channels after squeezing, but its "
            f"{spec.name!r} spec sets channels={given}; leave channels out to have it filled in"
        )
    return BLOCKS.build(spec, channels=channels)


@BLOCKS.register("multiscale")
class MultiScale(Block):
    """Glow's multi-scale flow: at each level squeeze, run the level's blocks, factor out half.

    Level ``l`` squeezes its input (``C → C·f²`` channels), runs its blocks and, except at
    the last level, splits the channels: the first half goes on to level ``l + 1``, the
    second half ``z_l`` is factored out. Nothing is dropped: the output re-assembles the
    factored halves and the last level's output by un-squeezing, so it has the input's shape
    ``(B, C, H, W)`` and the map is an exact bijection; :meth:`latents` takes the per-level
    pieces back out. The log-det is the sum of the levels' log-dets (squeezes and splits
    are permutations).

    Args:
        channels: Input channels ``C``.
        levels: One list of block specs per level. Blocks with a ``channels`` keyword get the
            level's channel count filled in (``C·f²`` at level 0, halved and times ``f²``
            at each further level); see :func:`glow_levels` for Glow's standard levels.
        factor: Squeeze factor ``f``; ``H`` and ``W`` must be divisible by ``f ** len(levels)``.

    Example:
        >>> flow = MultiScale(channels=3, levels=glow_levels(levels=2, depth=1, hidden_channels=8))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> z, logdet = flow(x)
        >>> z.shape, [tuple(piece.shape[1:]) for piece in flow.latents(z)]
        (torch.Size([2, 3, 8, 8]), [(6, 4, 4), (24, 2, 2)])
    """

    def __init__(
        self,
        channels: int,
        levels: Sequence[Sequence[Spec | Mapping[str, Any] | str]],
        factor: int = 2,
    ):
        super().__init__()
        if channels < 1:
            raise ValueError(f"multiscale needs channels >= 1, got {channels}")
        if not isinstance(factor, int) or factor < 2:
            raise ValueError(f"multiscale expected an integer factor >= 2, got {factor!r}")
        if isinstance(levels, str | Mapping) or not levels:
            raise ValueError(
                f"multiscale expected levels as a non-empty list of lists of block specs, "
                f"got {levels!r}"
            )
        self.channels, self.factor = channels, factor
        flows, width = [], channels
        for level, specs in enumerate(levels):
            if isinstance(specs, str | Mapping):
                raise ValueError(
                    f"multiscale level {level} must be a list of block specs, got {specs!r}"
                )
            width *= factor**2
            flows.append(Sequential(*(_build_with_channels(s, width, level) for s in specs)))
            width -= width // 2  # the factored-out half leaves
        self.levels = nn.ModuleList(flows)
        self.conditional = any(flow.conditional for flow in flows)

    def _check(self, x: Tensor, owner: str) -> None:
        check_image(owner, x, self.channels)
        scale = self.factor ** len(self.levels)
        if x.shape[2] % scale or x.shape[3] % scale:
            raise ValueError(
                f"{owner} with {len(self.levels)} levels of factor {self.factor} expected H and W "
                f"divisible by {scale}, got shape {tuple(x.shape)}"
            )

    @staticmethod
    def _halves(h: Tensor) -> tuple[Tensor, Tensor]:
        """Glow's split: the first half of the channels goes on, the second is factored out."""
        width = h.shape[1]
        return h.split((width - width // 2, width // 2), dim=1)

    def latents(self, y: Tensor) -> list[Tensor]:
        """The per-level pieces of an output ``y``: ``[z_0, …, z_{L-2}, last level's output]``."""
        self._check(y, "multiscale.latents")
        pieces, h = [], y
        for _ in range(len(self.levels) - 1):
            h, factored = self._halves(space_to_depth(h, self.factor))
            pieces.append(factored)
        return [*pieces, space_to_depth(h, self.factor)]

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "multiscale")
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        factored, h = [], x
        for level, flow in enumerate(self.levels):
            h, logdet = flow(space_to_depth(h, self.factor), ctx)
            total = total + logdet
            if level < len(self.levels) - 1:
                h, z = self._halves(h)
                factored.append(z)
        y = depth_to_space(h, self.factor)
        for z in reversed(factored):  # each level's output has the shape of its input
            y = depth_to_space(torch.cat([y, z], dim=1), self.factor)
        return y, total

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        *factored, h = self.latents(y)
        total = y.new_zeros(y.shape[0], dtype=logdet_dtype(y))
        for level in reversed(range(len(self.levels))):
            h, logdet = self.levels[level].inverse(h, ctx)
            total = total + logdet
            h = depth_to_space(h, self.factor)
            if level > 0:
                h = torch.cat([h, factored[level - 1]], dim=1)
        return h, total

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        coupling = {"hidden_channels": 8, "time_features": 8}
        block = cls(
            channels=2,
            levels=[
                [
                    "image_actnorm",
                    {"name": "conv1x1", "kwargs": {"seed": 1}},
                    {
                        "name": "conv_affine_coupling",
                        "kwargs": {"mask": "checkerboard", **coupling},
                    },
                ],
                [{"name": "conv_affine_coupling", "kwargs": {"mask": "channel", **coupling}}],
            ],
        )
        x = torch.randn(4, 2, 4, 4, generator=generator)
        ctx = Context(t=torch.rand(4, generator=generator))
        block(x, ctx)  # initialises the ActNorm, so later perturbations are not overwritten
        return block, x, ctx


def glow_levels(
    levels: int = 3,
    depth: int = 4,
    hidden_channels: int = 64,
    mask: str = "channel",
    time_features: int = 0,
    context_features: int = 0,
) -> list[list[dict[str, Any]]]:
    """Glow's levels as JSON-ready specs for :class:`MultiScale`.

    Each level has ``depth`` steps of ``image_actnorm → conv1x1 → conv_affine_coupling``,
    with a different seed for every 1x1 convolution and the coupling parity alternating.

    Args:
        levels: Number of levels.
        depth: Flow steps per level.
        hidden_channels: Hidden channels of the couplings' conditioners.
        mask: The couplings' mask, ``"channel"`` (Glow) or ``"checkerboard"`` (RealNVP).
        time_features: Width of the couplings' time embedding; 0 for none.
        context_features: Width of ``ctx.cond`` the couplings read; 0 for none.

    Example:
        >>> [spec["name"] for spec in glow_levels(levels=1, depth=1)[0]]
        ['image_actnorm', 'conv1x1', 'conv_affine_coupling']
    """
    coupling = {
        "mask": mask,
        "hidden_channels": hidden_channels,
        "time_features": time_features,
        "context_features": context_features,
    }
    return [
        [
            spec
            for step in range(depth)
            for spec in (
                {"name": "image_actnorm"},
                {"name": "conv1x1", "kwargs": {"seed": level * depth + step}},
                {"name": "conv_affine_coupling", "kwargs": {**coupling, "parity": step % 2 == 1}},
            )
        ]
        for level in range(levels)
    ]
