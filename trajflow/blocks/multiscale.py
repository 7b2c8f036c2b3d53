"""Glow's multi-scale flow on images: squeeze, run a level's blocks, factor out half, repeat.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS
    >>> flow = BLOCKS.build("multiscale", channels=3, levels=glow_levels(levels=2, depth=1))
    >>> z, logdet = flow(torch.randn(4, 3, 8, 8))
    >>> z.shape, [tuple(piece.shape[1:]) for piece in flow.latents(z)]
    (torch.Size([4, 3, 8, 8]), [(6, 4, 4), (24, 2, 2)])
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trajflow.blocks.image import check_image, depth_to_space, space_to_depth
from trajflow.core import BLOCKS, Block, Context, Sequential, logdet_dtype
from trajflow.registry import Spec

__all__ = ["MultiScale", "glow_levels"]


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
