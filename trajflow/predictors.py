"""Gaussian predictors: networks that read a noisier level and predict the next cleaner one.

A predictor maps the input level ``u_in`` (all ``K`` levels of a trajectory at once, shape
``(B, K, *event)``), its time ``t_in``, the target time ``t_out`` and the step count ``T``
(and optionally a condition ``y``) to two tensors shaped like ``u_in``: a clean-point
prediction (``x̂_0``, or a velocity ``v`` with ``target="velocity"``) and a log-scale
correction ``δ``. The NTM turns them into ``μ = A u_in + B x̂_0`` and ``σ = C · exp(δ)``.

Both heads that depend on ``t_out`` and ``T`` start at zero (the ``δ`` head and the
projection of the ``(t_out, T)`` embedding), so a predictor trained as a flow-matching
velocity network (which never sees ``t_out``) can be reused exactly.

Example:
    >>> import torch
    >>> net = PREDICTORS.build("mlp", features=2, hidden_features=[32, 32])
    >>> u, t = torch.randn(8, 4, 2), torch.rand(8, 4)
    >>> clean, delta = net(u, t, 0.5 * t, steps=torch.full((8,), 4))
    >>> clean.shape, delta.abs().max().item()
    (torch.Size([8, 4, 2]), 0.0)
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from trajflow.nn import TransformerLayer, sinusoidal_embedding
from trajflow.registry import Registry

__all__ = ["PREDICTORS", "MLPPredictor", "Predictor", "TrajectoryTransformer"]

TARGETS = ("x0", "velocity")


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Predictor(nn.Module, ABC):
    """Base class of predictors.

    Args:
        target: ``"x0"`` (the mean head predicts the clean point) or ``"velocity"``.
        cond_features: Width of the condition ``y`` (0 for unconditional).
        time_features: Width of the sinusoidal time embeddings.
    """

    def __init__(self, target: str, cond_features: int, time_features: int):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if time_features < 2 or time_features % 2:
            raise ValueError(f"time_features must be an even number >= 2, got {time_features}")
        self.target = target
        self.cond_features = cond_features
        self.time_features = time_features

    @property
    @abstractmethod
    def event_shape(self) -> tuple[int, ...]:
        """Per-level shape of the inputs, e.g. ``(D,)`` or ``(L, C)``."""

    def embed_times(
        self, t_in: Tensor, t_out: Tensor | None, steps: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Sinusoidal embeddings of ``t_in`` and of ``(t_out, T)`` (summed), each ``(B, K, F)``."""
        batch, levels = t_in.shape

        def embed(values: Tensor) -> Tensor:
            flat = sinusoidal_embedding(values.reshape(-1), self.time_features)
            return flat.reshape(batch, levels, -1)

        target = None
        if t_out is not None:
            target = embed(t_out.to(t_in.dtype))
        if steps is not None:
            steps_embedding = embed((steps.to(t_in.dtype) / 1000)[:, None].expand(batch, levels))
            target = steps_embedding if target is None else target + steps_embedding
        return embed(t_in), target

    def check_inputs(self, u: Tensor, t_in: Tensor) -> None:
        """Raises a ValueError naming the expected shapes."""
        expected = ("B", "K", *self.event_shape)
        if u.dim() != len(expected) or tuple(u.shape[2:]) != self.event_shape:
            raise ValueError(
                f"{type(self).__name__} expected u of shape {expected}, got {tuple(u.shape)}"
            )
        if t_in.shape != u.shape[:2]:
            raise ValueError(
                f"expected times of shape (B, K) = {tuple(u.shape[:2])}, got {tuple(t_in.shape)}"
            )

    @abstractmethod
    def forward(
        self,
        u: Tensor,
        t_in: Tensor,
        t_out: Tensor | None = None,
        steps: Tensor | None = None,
        y: Tensor | None = None,
        y_mask: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Predicts ``(x̂_0 or v, δ)`` for every level.

        Args:
            u: Input levels ``(B, K, *event)``.
            t_in: Their times ``(B, K)``.
            t_out: Times of the levels to predict ``(B, K)``; ``None`` for a plain velocity net.
            steps: Step count ``T`` per sample ``(B,)``.
            y: Condition (``(B, F)`` for the MLP, ``(B, M, F)`` tokens for the transformer).
            y_mask: Which condition tokens are real ``(B, M)``.
            drop: Per-sample bool ``(B,)``: replace ``y`` by the learned null condition
                (prompt dropout, and the unconditional branch of guidance).
        """

    def null_condition(
        self, y: Tensor | None, batch: int, drop: Tensor | None, like: Tensor
    ) -> Tensor | None:
        """``y`` with dropped (or missing) samples replaced by the learned null condition."""
        if not self.cond_features:
            if y is not None:
                raise ValueError(
                    f"{type(self).__name__} was built with cond_features=0: expected y=None, "
                    f"got a condition of shape {tuple(y.shape)}"
                )
            return None
        null = self.null.to(like.dtype)  # (F,) vector, or (1, F): one token
        if y is None:
            return null.expand(batch, *null.shape)
        expected = "(B, F)" if null.dim() == 1 else "(B, M, F)"
        if y.dim() != null.dim() + 1 or y.shape[0] != batch or y.shape[-1] != self.cond_features:
            raise ValueError(
                f"{type(self).__name__} expected y of shape {expected} with B={batch}, "
                f"F={self.cond_features}, got {tuple(y.shape)}"
            )
        y = y.to(like.dtype)
        if drop is None:
            return y
        if not isinstance(drop, Tensor) or drop.dtype != torch.bool or drop.shape != (batch,):
            got = (drop.dtype, tuple(drop.shape)) if isinstance(drop, Tensor) else type(drop)
            raise ValueError(
                f"{type(self).__name__} expected drop to be a bool tensor of shape ({batch},), "
                f"got {got}"
            )
        return torch.where(drop.reshape(-1, *([1] * (y.dim() - 1))), null.expand_as(y), y)


class MLPPredictor(Predictor):
    """A per-level MLP for vector data ``(B, K, D)`` (levels never see each other: Markov).

    Args:
        features: ``D``.
        hidden_features: Widths of the hidden layers.
        cond_features: Width of a conditioning vector ``y`` (0 for none).
        time_features: Width of the time embeddings.
        target: ``"x0"`` or ``"velocity"``.
    """

    def __init__(
        self,
        features: int,
        hidden_features: Sequence[int] = (256, 256, 256),
        cond_features: int = 0,
        time_features: int = 32,
        target: str = "x0",
    ):
        super().__init__(target, cond_features, time_features)
        if not hidden_features:
            raise ValueError("mlp predictor needs at least one hidden layer")
        self.features = features
        widths = list(hidden_features)
        self.input = nn.Linear(features + time_features + cond_features, widths[0])
        self.target_time = _zero_linear(time_features, widths[0])
        self.trunk = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.mean_head = nn.Linear(widths[-1], features)
        self.delta_head = _zero_linear(widths[-1] + 2 * time_features, features)
        if cond_features:
            self.null = nn.Parameter(torch.zeros(cond_features))

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.features,)

    def forward(self, u, t_in, t_out=None, steps=None, y=None, y_mask=None, drop=None):
        self.check_inputs(u, t_in)
        batch, levels = t_in.shape
        time, target_time = self.embed_times(t_in, t_out, steps)
        parts = [u, time.to(u.dtype)]
        condition = self.null_condition(y, batch, drop, u)
        if condition is not None:
            parts.append(condition[:, None, :].expand(batch, levels, -1))
        h = self.input(torch.cat(parts, dim=-1))
        if target_time is not None:
            h = h + self.target_time(target_time.to(u.dtype))
        h = F.silu(h)
        for layer in self.trunk:
            h = F.silu(layer(h))
        target_time = torch.zeros_like(time) if target_time is None else target_time
        delta = self.delta_head(torch.cat([h, time.to(h.dtype), target_time.to(h.dtype)], dim=-1))
        return self.mean_head(h), delta


class TrajectoryTransformer(Predictor):
    """A transformer over the tokens of every level, ``(B, K, L, C)``, in one parallel pass.

    Each level's tokens get the input projection, learned positions and the embeddings of
    ``t_in`` and ``(t_out, T)``. Conditioning tokens ``y`` ``(B, M, cond_features)`` are
    projected and prepended; every level attends to them.

    Level attention:
        * ``"markov"``: a level attends only to its own tokens (and ``y``): the paper's sampler.
        * ``"causal"``: block-causal from noisy to clean: the prediction for level ``k`` sees
          the inputs ``u_{k+1}, …, u_T`` (never level ``k`` or anything cleaner).

    Args:
        features: Channels ``C`` per token.
        tokens: Tokens ``L`` per level.
        dim: Width. layers: Depth. heads: Attention heads. mlp_ratio: MLP width factor.
        level_attention: ``"markov"`` or ``"causal"``.
        cond_features: Width of conditioning tokens (0 for none).
        time_features: Width of the time embeddings.
        target: ``"x0"`` or ``"velocity"``.
    """

    def __init__(
        self,
        features: int,
        tokens: int,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        level_attention: str = "markov",
        cond_features: int = 0,
        time_features: int = 64,
        target: str = "x0",
    ):
        super().__init__(target, cond_features, time_features)
        if level_attention not in ("markov", "causal"):
            raise ValueError(
                f"level_attention must be 'markov' or 'causal', got {level_attention!r}"
            )
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.features, self.tokens, self.level_attention = features, tokens, level_attention
        self.input = nn.Linear(features, dim)
        self.positions = nn.Parameter(0.02 * torch.randn(tokens, dim))
        self.time = nn.Linear(time_features, dim)
        self.target_time = _zero_linear(time_features, dim)
        self.condition = nn.Linear(cond_features, dim) if cond_features else None
        if cond_features:
            self.null = nn.Parameter(torch.zeros(1, cond_features))
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.mean_head = nn.Linear(dim, features)
        # δ reads the trunk and both time embeddings (as in the MLP), so that a finetuned
        # model whose only trainable part is this head can still make δ depend on the step.
        self.delta_head = _zero_linear(dim + 2 * time_features, features)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.tokens, self.features)

    def _causal_mask(
        self, levels: int, prefix: int, prefix_mask: Tensor | None, device
    ) -> Tensor | None:
        """Boolean ``(B or 1, 1, N, N)`` mask over ``[prefix tokens, level tokens]``: level
        ``k`` (input ``u_{k+1}``) reads levels ``k' >= k`` (noisier inputs only)."""
        level_of = torch.arange(levels, device=device).repeat_interleave(self.tokens)
        size = prefix + levels * self.tokens
        mask = torch.ones(size, size, dtype=torch.bool, device=device)
        mask[prefix:, prefix:] = level_of[None, :] >= level_of[:, None]
        mask[:prefix, prefix:] = False  # prefix tokens never read the trajectory
        mask = mask[None, None]
        if prefix_mask is not None:
            keys = torch.cat(
                [prefix_mask, prefix_mask.new_ones(len(prefix_mask), size - prefix)], 1
            )
            mask = mask & keys[:, None, None, :]
            mask = mask | torch.eye(size, dtype=torch.bool, device=device)  # no empty rows
        return mask

    def _markov(self, h: Tensor, prefix: Tensor | None, prefix_mask: Tensor | None) -> Tensor:
        """Markov levels folded into the batch: ``(B, K, L, d)`` → ``(B, K, L, d)``.

        Each level attends to its own tokens and the prefix. The prefix never reads the
        trajectory, so it runs once per sample and its keys/values are shared by the ``K``
        levels: the cost is linear in ``K`` (a block mask over all levels is quadratic).
        """
        batch, levels = h.shape[:2]
        h = rearrange(h, "b k l d -> (b k) l d")
        if prefix is None:
            for layer in self.layers:
                h = layer(h, None, 0, None)[0]
            return rearrange(self.norm(h), "(b k) l d -> b k l d", b=batch)
        size = prefix.shape[1]
        prefix_attention = level_attention = None
        if prefix_mask is not None:
            eye = torch.eye(size, dtype=torch.bool, device=h.device)
            prefix_attention = prefix_mask[:, None, None, :] | eye  # no empty rows
            keys = torch.cat([prefix_mask, prefix_mask.new_ones(batch, self.tokens)], dim=1)
            level_attention = keys.repeat_interleave(levels, dim=0)[:, None, None, :]
        for layer in self.layers:
            prefix, cache = layer(prefix, None, 0, prefix_attention)
            # The prefix keys/values of each sample, once per level, and room for the level's
            # own (written in place under no_grad, concatenated with autograd on).
            # In h's dtype: under autocast the prefix may come out bf16 and h float32, and
            # attention needs one dtype (the in-place writes below would keep the prefix's).
            cache = cache.repeat_interleave(levels, dim=1).to(h.dtype)
            cache = torch.cat(
                [cache, cache.new_empty(*cache.shape[:3], self.tokens, cache.shape[4])], 3
            )
            h = layer(h, cache, size, level_attention)[0]
        return rearrange(self.norm(h), "(b k) l d -> b k l d", b=batch)

    def _check_mask(self, y_mask: Tensor | None, condition: Tensor | None, y: Tensor | None):
        if y_mask is None:
            return
        if y is None:
            raise ValueError("TrajectoryTransformer got y_mask without y")
        if not isinstance(y_mask, Tensor) or y_mask.dtype != torch.bool:
            got = y_mask.dtype if isinstance(y_mask, Tensor) else type(y_mask).__name__
            raise TypeError(f"TrajectoryTransformer expected a bool y_mask tensor, got {got}")
        if y_mask.shape != condition.shape[:2]:
            raise ValueError(
                f"TrajectoryTransformer expected y_mask of shape (B, M) = "
                f"{tuple(condition.shape[:2])}, got {tuple(y_mask.shape)}"
            )

    def forward(self, u, t_in, t_out=None, steps=None, y=None, y_mask=None, drop=None):
        self.check_inputs(u, t_in)
        batch, levels = t_in.shape
        time, target_time = self.embed_times(t_in, t_out, steps)
        time = time.to(u.dtype)
        h = self.input(u) + self.positions.to(u.dtype) + self.time(time)[:, :, None, :]
        if target_time is None:  # a plain velocity call: the (t_out, T) path stays unused
            target_time = torch.zeros_like(time)
        else:
            target_time = target_time.to(u.dtype)
            h = h + self.target_time(target_time)[:, :, None, :]
        condition = self.null_condition(y, batch, drop, u)
        self._check_mask(y_mask, condition, y)
        prefix = 0 if condition is None else condition.shape[1]
        if condition is not None and drop is not None:
            # A dropped prompt is exactly one null token (as with y=None), whatever the padded
            # length M of the batch: keep its first position, mask the other M - 1.
            first = torch.arange(prefix, device=u.device) == 0
            kept = y_mask if y_mask is not None else drop.new_ones(batch, prefix)
            y_mask = torch.where(drop[:, None], first[None, :], kept)
        tokens = None if condition is None else self.condition(condition)
        if self.level_attention == "markov":
            h = self._markov(h, tokens, y_mask)
        else:
            sequence = rearrange(h, "b k l d -> b (k l) d")
            if tokens is not None:
                sequence = torch.cat([tokens, sequence], dim=1)
            mask = self._causal_mask(levels, prefix, y_mask, u.device)
            for layer in self.layers:
                sequence = layer(sequence, None, 0, mask)[0]
            h = rearrange(self.norm(sequence[:, prefix:]), "b (k l) d -> b k l d", k=levels)
        times = torch.cat([time, target_time], dim=-1)[:, :, None, :].expand(
            -1, -1, self.tokens, -1
        )
        return self.mean_head(h), self.delta_head(torch.cat([h, times], dim=-1))


#: Registered predictors.
PREDICTORS: Registry[type[Predictor]] = Registry("predictor")
PREDICTORS.register("mlp")(MLPPredictor)
PREDICTORS.register("trajectory_transformer")(TrajectoryTransformer)
