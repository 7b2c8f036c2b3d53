"""Network pieces shared by blocks and predictors: MLPs, context embeddings, transformer layers.

Example:
    >>> import torch
    >>> from trajflow.core import Context
    >>> encoder = ContextEncoder(cond_features=3, time_features=8)
    >>> ctx = Context(t=torch.rand(5), cond=torch.randn(5, 3))
    >>> encoder(ctx, owner="demo").shape
    torch.Size([5, 11])
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajflow.core import Context

__all__ = ["MLP", "ContextEncoder", "TransformerLayer", "full_precision", "sinusoidal_embedding"]


def sinusoidal_embedding(values: Tensor, features: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of scalar values (times in ``[0, 1]``, step counts, ...).

    Args:
        values: Shape ``(B,)``.
        features: Even output width.
        max_period: Longest period of the sinusoids, relative to a unit input.

    Returns:
        Shape ``(B, features)``: ``[cos(ω_i v), sin(ω_i v)]`` with ω_i geometric in
        ``[1, 1000]``, so inputs in ``[0, 1]`` are resolved finely.
    """
    if features % 2:
        raise ValueError(f"sinusoidal_embedding expected an even width, got {features}")
    half = features // 2
    # Scale by 1000 so that times in [0, 1] span as many periods as integer steps would.
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half
    )
    angles = 1000.0 * values.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return embedding.to(values.dtype if values.is_floating_point() else torch.float32)


class MLP(nn.Sequential):
    """A multi-layer perceptron acting on the last dimension.

    Args:
        in_features: Input width.
        out_features: Output width.
        hidden_features: Widths of the hidden layers.
        activation: Activation module class between layers.
        zero_init: Zero the last layer's weight and bias, so the MLP starts at 0.

    Example:
        >>> mlp = MLP(4, 2, hidden_features=(16, 16), zero_init=True)
        >>> mlp(torch.randn(3, 7, 4)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.SiLU,
        zero_init: bool = False,
    ):
        layers: list[nn.Module] = []
        widths = [in_features, *hidden_features]
        for before, after in itertools.pairwise(widths):
            layers += [nn.Linear(before, after), activation()]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features
        if zero_init:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)


class ContextEncoder(nn.Module):
    """Turns a :class:`~trajflow.core.Context` into one conditioning vector per sample.

    The output concatenates the conditioning vector ``ctx.cond`` (``cond_features`` wide)
    and a sinusoidal embedding of the time ``ctx.t`` (``time_features`` wide). When
    ``ctx.steps`` is given, the embedding of the step count is *added* to the time
    embedding, so the width does not depend on it.

    Args:
        cond_features: Width of ``ctx.cond``; 0 if the owner takes no conditioning vector.
        time_features: Width of the time embedding; 0 if the owner is not time-conditioned.
    """

    def __init__(self, cond_features: int = 0, time_features: int = 0):
        super().__init__()
        if cond_features < 0 or time_features < 0:
            raise ValueError("ContextEncoder expected non-negative widths")
        if time_features % 2:
            raise ValueError(f"time_features must be even, got {time_features}")
        self.cond_features = cond_features
        self.time_features = time_features

    @property
    def features(self) -> int:
        """Width of the encoded vector."""
        return self.cond_features + self.time_features

    def forward(self, ctx: Context | None, owner: str, batch: int | None = None) -> Tensor | None:
        """Encodes ``ctx`` for the block named ``owner`` (used in error messages).

        Returns:
            Shape ``(B, features)``, or ``None`` when the owner is unconditional.

        Raises:
            ValueError: If a needed field is missing or has the wrong shape.
        """
        if self.features == 0:
            return None
        needed = (["cond"] if self.cond_features else []) + (["t"] if self.time_features else [])
        if ctx is None:
            raise ValueError(f"{owner} is conditional and needs a Context with {needed}")
        ctx.require(owner, *needed)
        parts = []
        if self.cond_features:
            cond = ctx.cond
            if cond.dim() != 2 or cond.shape[1] != self.cond_features:
                raise ValueError(
                    f"{owner} expected ctx.cond of shape (B, {self.cond_features}), "
                    f"got {tuple(cond.shape)}"
                )
            parts.append(cond)
        if self.time_features:
            t = ctx.t
            if t.dim() != 1:
                raise ValueError(f"{owner} expected ctx.t of shape (B,), got {tuple(t.shape)}")
            embedding = sinusoidal_embedding(t, self.time_features)
            if ctx.steps is not None:
                embedding = embedding + sinusoidal_embedding(
                    ctx.steps.float() / 1000.0, self.time_features
                )
            parts.append(embedding)
        encoded = torch.cat([p.to(parts[0].dtype) for p in parts], dim=-1)
        if batch is not None and encoded.shape[0] != batch:
            raise ValueError(
                f"{owner} got a context of batch size {encoded.shape[0]} for an input of {batch}"
            )
        return encoded


def full_precision(h: Tensor) -> contextlib.AbstractContextManager:
    """Disables autocast (if on) so norms, softmax and the affine maths keep ``h``'s dtype."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.autocast(h.device.type, enabled=False)
    return contextlib.nullcontext()


class TransformerLayer(nn.Module):
    """A pre-LayerNorm transformer layer whose attention takes an explicit KV cache."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        h: Tensor,
        cache: Tensor | None,
        start: int,
        mask: Tensor | None,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Runs positions ``[start, start + S)`` given the keys/values of those before.

        Args:
            h: The new positions, shape ``(B, S, dim)``.
            cache: Keys and values of the earlier positions stacked, shape
                ``(2, B, heads, ≥ start, head_dim)``, or None if there are none. Under
                ``torch.no_grad`` it is a preallocated buffer the new positions are written
                into; with autograd on, a fresh concatenation is made instead, since autograd
                keeps the tensors it has seen.
            start: Position of the first new token.
            mask: Boolean attention mask for the new queries over keys ``[0, start + S)``.
            is_causal: Plain causal attention (with ``mask`` None and no cache).

        Returns:
            The new positions after the layer and the cache to pass on.
        """
        batch, length, dim = h.shape
        end = start + length
        # nn.functional directly: this runs once per token per layer in the KV-cache loop.
        with full_precision(h):
            normed = F.layer_norm(h, (dim,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        qkv = F.linear(normed, self.qkv.weight, self.qkv.bias).to(h.dtype)
        qkv = qkv.view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if cache is None:
            cache = qkv[1:]
        elif torch.is_grad_enabled():
            cache = torch.cat([cache[:, :, :, :start], qkv[1:]], dim=3)
        else:
            cache[:, :, :, start:end] = qkv[1:]
        with full_precision(h):
            attended = F.scaled_dot_product_attention(
                qkv[0],
                cache[0, :, :, :end],
                cache[1, :, :, :end],
                attn_mask=mask,
                is_causal=is_causal,
            )
        attended = attended.transpose(1, 2).reshape(batch, length, dim)
        h = h + F.linear(attended, self.proj.weight, self.proj.bias).to(h.dtype)
        with full_precision(h):
            normed = F.layer_norm(h, (dim,), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        hidden = F.gelu(F.linear(normed, self.mlp[0].weight, self.mlp[0].bias))
        return h + F.linear(hidden, self.mlp[2].weight, self.mlp[2].bias).to(h.dtype), cache
