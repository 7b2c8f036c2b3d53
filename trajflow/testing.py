"""Checks that any block, built-in or your own, is invertible with an exact log-determinant.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS
    >>> from trajflow.testing import check_block, perturb_parameters
    >>> block, x, ctx = BLOCKS.get("affine_coupling").example(torch.Generator().manual_seed(0))
    >>> block = perturb_parameters(block.double(), scale=0.1, seed=0)
    >>> report = check_block(block, x.double(), cast_context(ctx, torch.float64))
    >>> report.max_logdet_error < 1e-8
    True
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from trajflow.core import Block, Context

__all__ = ["BlockReport", "cast_context", "check_block", "perturb_parameters"]


@dataclasses.dataclass(frozen=True)
class BlockReport:
    """What :func:`check_block` measured (all maxima over the batch)."""

    max_roundtrip_error: float
    max_inverse_roundtrip_error: float
    max_logdet_error: float
    max_inverse_logdet_error: float
    max_cross_sample_jacobian: float


def cast_context(
    ctx: Context | None, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Context | None:
    """Moves a context to ``device`` and its floating fields to ``dtype`` (masks stay bool)."""
    if ctx is None:
        return None
    return ctx.map(lambda v: v.to(device, dtype) if v.is_floating_point() else v.to(device))


def perturb_parameters(block: Block, scale: float = 0.1, seed: int = 0) -> Block:
    """Adds seeded Gaussian noise to every floating parameter, in place; returns ``block``.

    Zero-initialised blocks are the identity, for which every check passes trivially; a
    perturbation makes the checks bite.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            if parameter.is_floating_point():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.add_(scale * noise.to(parameter))
    return block


def _jacobian_blocks(fn, x: Tensor) -> tuple[Tensor, float]:
    """Per-sample Jacobians of a batched map and the largest cross-sample entry."""
    batch = x.shape[0]
    jacobian = torch.autograd.functional.jacobian(fn, x)  # (B, *out, B, *in)
    jacobian = jacobian.reshape(batch, -1, batch, x[0].numel())
    diagonal = torch.stack([jacobian[i, :, i, :] for i in range(batch)])
    mask = ~torch.eye(batch, dtype=torch.bool)[:, None, :, None].expand_as(jacobian)
    cross = jacobian[mask].abs().max().item() if batch > 1 else 0.0
    return diagonal, cross


def check_block(
    block: Block,
    x: Tensor,
    ctx: Context | None = None,
    *,
    atol: float = 1e-6,
    jacobian: bool = True,
) -> BlockReport:
    """Checks invertibility and the log-determinant of ``block`` at the batch ``x``.

    Runs in whatever dtype ``block`` and ``x`` have; use float64 for tight tolerances.
    The block is deep-copied, so stateful blocks (ActNorm's first call) are left as they were.

    Checks:
        * ``inverse(forward(x)) == x`` and ``forward(inverse(x)) == x`` (``x`` reused as a latent,
          reshaped to the output's layout for blocks such as ``squeeze`` that change the shape);
        * forward logdet equals ``slogdet`` of the autograd Jacobian of each sample;
        * inverse logdet is minus the forward logdet at the matching point;
        * outputs are finite and no sample's output depends on another sample's input.

    Args:
        block: The block to check.
        x: An input batch, ``(B, D)``, ``(B, L, C)`` or ``(B, C, H, W)``.
        ctx: The context the block needs, if any.
        atol: Absolute tolerance of every check.
        jacobian: Also compare with the autograd Jacobian (costs ``B·numel`` backward passes).

    Returns:
        The measured errors.

    Raises:
        AssertionError: Naming the first check that failed and by how much.
    """
    block = copy.deepcopy(block)

    def expect(condition: bool, message: str) -> None:
        if not condition:
            raise AssertionError(f"{type(block).__name__}: {message}")

    with torch.no_grad():
        y, logdet = block(x, ctx)
        # A bijection keeps the number of entries; the layout may change (space-to-depth).
        expect(
            y.numel() == x.numel(), f"forward changed the size {tuple(x.shape)} -> {tuple(y.shape)}"
        )
        latent = x.reshape(y.shape)
        x_again, inverse_logdet = block.inverse(y, ctx)
        x_from_latent, logdet_from_latent = block.inverse(latent, ctx)
        latent_again, logdet_back = block(x_from_latent, ctx)

    expect(logdet.shape == (x.shape[0],), f"logdet has shape {tuple(logdet.shape)}, expected (B,)")
    expect(bool(torch.isfinite(y).all() and torch.isfinite(logdet).all()), "non-finite output")
    roundtrip = (x_again - x).abs().max().item()
    inverse_roundtrip = (latent_again - latent).abs().max().item()
    inverse_logdet_error = max(
        (inverse_logdet + logdet).abs().max().item(),
        (logdet_from_latent + logdet_back).abs().max().item(),
    )
    expect(roundtrip <= atol, f"inverse(forward(x)) differs from x by {roundtrip:.3g}")
    expect(
        inverse_roundtrip <= atol, f"forward(inverse(x)) differs from x by {inverse_roundtrip:.3g}"
    )
    expect(
        inverse_logdet_error <= atol,
        f"inverse logdet differs from minus the forward logdet by {inverse_logdet_error:.3g}",
    )

    logdet_error, cross = 0.0, 0.0
    if jacobian:
        diagonal, cross = _jacobian_blocks(lambda inputs: block(inputs, ctx)[0], x)
        _, reference = torch.linalg.slogdet(diagonal)
        logdet_error = (reference.to(logdet) - logdet).abs().max().item()
        expect(cross <= atol, f"outputs depend on other samples' inputs ({cross:.3g})")
        expect(
            logdet_error <= atol * max(1, x[0].numel()),
            f"logdet differs from slogdet of the Jacobian by {logdet_error:.3g}",
        )

    return BlockReport(roundtrip, inverse_roundtrip, logdet_error, inverse_logdet_error, cross)
