"""The block protocol: invertible maps with exact log-determinants.

Direction convention: calling a block maps *data to latent* (the normalizing direction);
:meth:`Block.inverse` maps latent to data (the sampling direction). Both return the output
and ``log|det ∂out/∂in|`` of the direction called, summed over every non-batch dimension,
shape ``(B,)``.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS, Sequential
    >>> flow = Sequential(BLOCKS.build("actnorm", features=3), BLOCKS.build("reverse"))
    >>> x = torch.randn(8, 3)
    >>> z, logdet = flow(x)
    >>> x_again, minus_logdet = flow.inverse(z)
    >>> torch.allclose(x, x_again, atol=1e-5), torch.allclose(logdet, -minus_logdet)
    (True, True)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from trajflow.registry import Registry, Spec

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "BLOCKS",
    "Block",
    "Context",
    "Inverse",
    "Sequential",
    "check_features",
    "logdet_dtype",
    "sum_except_batch",
]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a block may be conditioned on. Every field is optional.

    Attributes:
        t: Time of the trajectory level, shape ``(B,)``.
        steps: Number of coarse steps ``T`` the model runs with, shape ``(B,)``.
        cond: A conditioning vector, shape ``(B, F)``.
        tokens: Conditioning prefix tokens, shape ``(B, M, F)``.
        mask: Which prefix tokens are real (``True``) or padding, shape ``(B, M)``.

    Example:
        >>> ctx = Context(t=torch.full((4,), 0.5))
        >>> ctx.batch_size
        4
        >>> ctx.map(lambda v: v[:2]).t.shape
        torch.Size([2])
    """

    t: Tensor | None = None
    steps: Tensor | None = None
    cond: Tensor | None = None
    tokens: Tensor | None = None
    mask: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Context:
        """Applies ``fn`` to every tensor field (e.g. indexing, ``.to(device)``)."""
        return Context(
            **{
                field.name: None if (value := getattr(self, field.name)) is None else fn(value)
                for field in dataclasses.fields(self)
            }
        )

    @property
    def batch_size(self) -> int | None:
        """The batch size of the first tensor field set, or ``None`` if none is."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                return value.shape[0]
        return None

    def require(self, owner: str, *names: str) -> None:
        """Raises a ValueError naming ``owner`` if any of the fields ``names`` is missing."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{owner} needs context fields {missing}; got a Context without them")


def sum_except_batch(x: Tensor) -> Tensor:
    """Sums every dimension but the first, returning shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def logdet_dtype(x: Tensor) -> torch.dtype:
    """The dtype log-determinants are accumulated in: float32 or wider, even for bf16 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def check_features(
    owner: str,
    x: Tensor,
    features: int | None,
    *,
    ranks: tuple[int, ...] = (2, 3),
) -> None:
    """Validates a block input: floating dtype, ``(B, D)`` / ``(B, L, C)`` rank, feature size.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If its rank or last dimension is not what ``owner`` expects.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expected a floating-point tensor, got dtype {x.dtype}")
    layouts = {2: "(B, D)", 3: "(B, L, C)"}
    expected = " or ".join(layouts.get(rank, f"rank {rank}") for rank in ranks)
    if x.dim() not in ranks:
        raise ValueError(f"{owner} expected shape {expected}, got {tuple(x.shape)}")
    if features is not None and x.shape[-1] != features:
        name = "D" if x.dim() == 2 else "C"
        raise ValueError(
            f"{owner} expected {expected} with {name}={features}, got {tuple(x.shape)}"
        )


class Block(nn.Module, ABC):
    """Base class of invertible blocks.

    Subclasses implement :meth:`forward` (data → latent) and :meth:`inverse`
    (latent → data), each returning ``(output, logdet)``, and a classmethod
    :meth:`example` giving a tiny instance with a matching input, which the property
    tests, the docs and :func:`trajflow.testing.check_block` use. Concrete blocks are
    registered in :data:`BLOCKS` under a stable snake_case name.
    """

    #: Set by :meth:`Registry.register`.
    registered_name: ClassVar[str | None] = None
    #: Containers of other blocks (not registered, not property-tested on their own).
    composite: ClassVar[bool] = False
    #: Whether the block reads the context (the property tests then check it matters).
    conditional: bool = False

    @property
    def uses_time(self) -> bool:
        """Whether the block reads ``ctx.t`` (an NTM rejects a transporter that does not).

        True when the block or one of its submodules has a non-zero ``time_features``, the
        convention of every built-in block and of :class:`~trajflow.nn.ContextEncoder`. A
        custom block that reads ``ctx.t`` some other way overrides this (a container asks
        the blocks it holds, so their overrides count).
        """
        if getattr(self, "time_features", 0):
            return True
        pending = list(self.children())
        while pending:
            module = pending.pop()
            if isinstance(module, Block):
                if module.uses_time:
                    return True
            elif getattr(module, "time_features", 0):
                return True
            else:
                pending.extend(module.children())
        return False

    @abstractmethod
    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        """Maps data to latent; returns ``(y, log|det ∂y/∂x|)``."""

    @abstractmethod
    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        """Maps latent to data; returns ``(x, log|det ∂x/∂y|)``."""

    @property
    def inv(self) -> Inverse:
        """A view of this block with its directions swapped (shares parameters)."""
        return Inverse(self)

    @classmethod
    @abstractmethod
    def example(
        cls, generator: torch.Generator | None = None
    ) -> tuple[Self, Tensor, Context | None]:
        """A tiny instance, an input batch and a context (or ``None``) for tests and docs.

        The instance is freshly initialised (often the identity); tests perturb its
        parameters before checking anything.
        """


class Sequential(Block):
    """A composition of blocks; the forward applies them in order and sums log-dets.

    Args:
        blocks: The blocks, or registry specs to build them from.

    Example:
        >>> flow = Sequential.from_specs([
        ...     {"name": "affine_coupling", "kwargs": {"features": 4}},
        ...     {"name": "reverse"},
        ... ])
        >>> len(flow)
        2
    """

    composite = True

    def __init__(self, *blocks: Block):
        super().__init__()
        for block in blocks:
            if not isinstance(block, Block):
                raise TypeError(f"Sequential expected Block instances, got {type(block).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.conditional = any(block.conditional for block in blocks)

    @classmethod
    def from_specs(cls, specs: Iterable[Spec | dict | str]) -> Sequential:
        """Builds each block from :data:`BLOCKS` and chains them."""
        return cls(*(BLOCKS.build(spec) for spec in specs))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Block:
        return self.blocks[index]

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        for block in self.blocks:
            x, logdet = block(x, ctx)
            total = total + logdet
        return x, total

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        total = y.new_zeros(y.shape[0], dtype=logdet_dtype(y))
        for block in reversed(self.blocks):
            y, logdet = block.inverse(y, ctx)
            total = total + logdet
        return y, total

    @classmethod
    def example(cls, generator: torch.Generator | None = None) -> tuple[Sequential, Tensor, None]:
        x = torch.randn(5, 4, generator=generator)
        flow = cls.from_specs(
            [
                {"name": "affine_coupling", "kwargs": {"features": 4}},
                {"name": "fixed_permutation", "kwargs": {"features": 4}},
            ]
        )
        return flow, x, None


class Inverse(Block):
    """Swaps the directions of a block: ``Inverse(b)(y) == b.inverse(y)``.

    Example:
        >>> block = BLOCKS.build("affine_coupling", features=4)
        >>> isinstance(block.inv.inv, Block)
        True
    """

    composite = True

    def __init__(self, block: Block):
        super().__init__()
        self.block = block
        self.conditional = block.conditional

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self.block.inverse(x, ctx)

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        return self.block(y, ctx)

    @property
    def inv(self) -> Block:
        return self.block

    @classmethod
    def example(cls, generator: torch.Generator | None = None) -> tuple[Inverse, Tensor, None]:
        block, x, ctx = BLOCKS.get("affine_coupling").example(generator)
        return cls(block), x, ctx


#: The registry of invertible blocks; ``trajflow.blocks`` fills it on import.
BLOCKS: Registry[type[Block]] = Registry("block")
