"""TarFlow block: an autoregressive affine flow over tokens, parameterised by a causal transformer.

Token ``n`` of a sequence ``(B, L, C)`` is transformed as ``z_n = (x_n - b_n) · exp(-a_n)``,
where the shift ``b_n`` and log-scale ``a_n`` come from a causal transformer that sees only
the tokens before ``n``. The transformer reads

    [prefix tokens (conditioning, M of them), start token, x_0, ..., x_{L-2}]

so its output at the last ``L`` positions gives ``(b_n, a_n)`` for every ``n``, token 0
included (it is parameterised by a learned start token). The Jacobian is block triangular,
so the forward (data → latent) is one parallel pass and ``log|det| = -Σ a``. The inverse is
sequential; two algorithms are provided:

- :meth:`TarFlowBlock.inverse_kv_cache`: one token at a time, each step running a single
  token through the layers against explicit per-layer key/value caches.
- :meth:`TarFlowBlock.inverse_jacobi`: blocks of tokens solved by Jacobi fixed-point
  iteration, every iteration recomputing the ``(a, b)`` of the block's unsettled tokens in
  parallel. A block of ``k`` tokens is exact after ``k`` iterations and usually within
  tolerance much sooner. It trades more arithmetic for fewer sequential steps, so it pays
  where the hardware has parallelism to spare (GPUs, small batches).

Neither inverse holds state: caches are passed between layers and steps explicitly. Under
``torch.no_grad`` they are preallocated and written in place; with autograd on they are
concatenated, so gradients flow through both inverses.

Norms, attention and the affine arithmetic run in float32 (or wider) even under bf16
autocast; the output projection is zero-initialised, so a new block is the identity.

Example:
    >>> import torch
    >>> from trajflow import BLOCKS
    >>> block = BLOCKS.build("tarflow", features=4, tokens=8, dim=32, heads=2)
    >>> x = torch.randn(3, 8, 4)
    >>> z, logdet = block(x)
    >>> torch.equal(z, x), logdet.abs().max().item()  # identity at initialisation
    (True, 0.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajflow.blocks.coupling import soft_clamp
from trajflow.core import BLOCKS, Block, Context, check_features, logdet_dtype
from trajflow.nn import ContextEncoder, TransformerLayer, full_precision

__all__ = ["TarFlowBlock"]

#: Per layer, the keys and values of the positions run so far: ``(2, B, heads, S, head_dim)``.
KVCache = list[Tensor]

_INVERSE_METHODS = ("kv_cache", "jacobi")


def _attention_mask(
    real: Tensor | None, prefix: int, first: int, last: int, device: torch.device
) -> Tensor:
    """Which keys each query may attend to (True = attend), shape ``(B or 1, 1, nq, nk)``.

    Positions are absolute in ``[prefix tokens, data slots]``; queries are ``[first, last)``
    and keys ``[0, last)``. Data slots are causal; every query sees the real prefix tokens
    (the prefix attends to itself both ways), and itself, so no row is empty even when all
    prefix tokens are padding.
    """
    query = torch.arange(first, last, device=device)[:, None]
    key = torch.arange(last, device=device)[None, :]
    allowed = ((key >= prefix) & (key <= query)) | (key == query)
    if prefix == 0:
        return allowed[None, None]
    if real is None:
        return (allowed | (key < prefix))[None, None]
    real_keys = F.pad(real, (0, last - prefix))  # data slots are never "real prefix"
    return (allowed[None] | real_keys[:, None, :])[:, None]


def _resolution_floor(z: Tensor) -> float:
    """The smallest Jacobi tolerance the arithmetic can resolve (0 outside autocast).

    Under bf16 or float16 autocast the shifts and log-scales come from a network computing in
    that precision, so from one iteration to the next they move by rounding noise of about its
    machine epsilon times the values' size, and a finer tolerance is never met: every block
    would run to ``max_iters``. The floor is a few epsilons of the latent's magnitude.
    """
    if not torch.is_autocast_enabled(z.device.type):
        return 0.0
    low = torch.get_autocast_dtype(z.device.type)
    scale = max(1.0, float(z.detach().abs().amax())) if z.numel() else 1.0
    return 4 * torch.finfo(low).eps * scale


@BLOCKS.register("tarflow")
class TarFlowBlock(Block):
    """Autoregressive affine flow over tokens ``(B, L, C)`` with a causal transformer (TarFlow).

    Args:
        features: Channels ``C`` of a token.
        tokens: Largest sequence length ``L`` (size of the learned positional embedding).
        dim: Width of the transformer.
        layers: Number of transformer layers.
        heads: Attention heads; must divide ``dim``.
        mlp_ratio: Hidden width of the MLPs relative to ``dim``.
        flip: Reverse the token order before and after, i.e. scan from the last token.
            Alternate it in successive blocks.
        cond_features: Width of the conditioning prefix tokens ``ctx.tokens`` (B, M, F),
            with optional ``ctx.mask`` (B, M), True for real tokens; 0 for none.
        time_features: Width of the sinusoidal embedding of ``ctx.t`` (plus that of
            ``ctx.steps`` when given), projected and added to every token; 0 for none.
        scale_bound: The log-scale is ``scale_bound · tanh(raw / scale_bound)``.
        jacobi_block: Default tokens per block of :meth:`inverse_jacobi`.
        jacobi_tol: Default tolerance (max absolute change) of :meth:`inverse_jacobi`.
        jacobi_max_iters: Default iteration limit per block of :meth:`inverse_jacobi`.
        inverse_method: What :meth:`inverse` runs: ``"kv_cache"`` (exact) or ``"jacobi"``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = TarFlowBlock(features=2, tokens=5, dim=16, heads=2, time_features=8)
        >>> with torch.no_grad():
        ...     _ = block.head.weight.normal_(std=0.1)  # leave the identity
        >>> x, ctx = torch.randn(4, 5, 2), Context(t=torch.rand(4))
        >>> z, logdet = block(x, ctx)
        >>> x_again, minus_logdet = block.inverse(z, ctx)
        >>> # The inverse recomputes (a, b) from its own output: equal up to float32 rounding.
        >>> torch.allclose(x_again, x, atol=1e-5), torch.allclose(minus_logdet, -logdet, atol=1e-5)
        (True, True)
    """

    def __init__(
        self,
        features: int,
        tokens: int,
        *,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        flip: bool = False,
        cond_features: int = 0,
        time_features: int = 0,
        scale_bound: float = 4.0,
        jacobi_block: int = 16,
        jacobi_tol: float = 1e-3,
        jacobi_max_iters: int = 32,
        inverse_method: str = "kv_cache",
    ):
        super().__init__()
        for name, value, least in [
            ("features", features, 1),
            ("tokens", tokens, 1),
            ("dim", dim, 1),
            ("layers", layers, 1),
            ("heads", heads, 1),
            ("cond_features", cond_features, 0),
            ("time_features", time_features, 0),
            ("jacobi_block", jacobi_block, 1),
            ("jacobi_max_iters", jacobi_max_iters, 1),
        ]:
            if not isinstance(value, int) or value < least:
                raise ValueError(f"tarflow needs an integer {name} >= {least}, got {value!r}")
        if dim % heads:
            raise ValueError(f"tarflow needs heads to divide dim, got dim={dim}, heads={heads}")
        if time_features % 2:
            raise ValueError(f"tarflow needs an even time_features, got {time_features}")
        if not mlp_ratio > 0:
            raise ValueError(f"tarflow needs mlp_ratio > 0, got {mlp_ratio}")
        if not scale_bound > 0:
            raise ValueError(f"tarflow needs scale_bound > 0, got {scale_bound}")
        if not jacobi_tol >= 0:
            raise ValueError(f"tarflow needs jacobi_tol >= 0, got {jacobi_tol}")
        if inverse_method not in _INVERSE_METHODS:
            raise ValueError(
                f"tarflow inverse_method must be one of {_INVERSE_METHODS}, got {inverse_method!r}"
            )
        self.features = features
        self.tokens = tokens
        self.dim = dim
        self.heads = heads
        self.flip = flip
        self.cond_features = cond_features
        self.time_features = time_features
        self.scale_bound = scale_bound
        self.jacobi_block = jacobi_block
        self.jacobi_tol = jacobi_tol
        self.jacobi_max_iters = jacobi_max_iters
        self.inverse_method = inverse_method
        self.conditional = cond_features > 0 or time_features > 0

        self.embed = nn.Linear(features, dim)
        self.positions = nn.Parameter(0.02 * torch.randn(tokens, dim))
        self.start = nn.Parameter(0.02 * torch.randn(dim))
        self.cond_embed = nn.Linear(cond_features, dim) if cond_features else None
        self.context = ContextEncoder(0, time_features)
        self.time_embed = nn.Linear(time_features, dim) if time_features else None
        self.transformer = nn.ModuleList(
            TransformerLayer(dim, heads, mlp_ratio) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2 * features)
        # Zero weight *and* bias: a new block is exactly the identity.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # ----------------------------------------------------------------------------------------
    # Pieces shared by the three passes.

    def _check(self, x: Tensor) -> None:
        check_features("tarflow", x, self.features, ranks=(3,))
        if not 1 <= x.shape[1] <= self.tokens:
            raise ValueError(
                f"tarflow was built for 1 to {self.tokens} tokens, got L={x.shape[1]} "
                f"in input of shape {tuple(x.shape)}"
            )

    def _condition(
        self, x: Tensor, ctx: Context | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Validates the context; embeds it as a prefix and as a bias of the data slots.

        Returns:
            The prefix ``(B, M, dim)`` or None, its real-token mask ``(B, M)`` or None, and the
            bias of the data slots ``(B or 1, L, dim)``: positions plus the time embedding,
            which the prefix gets too, so it reaches every token.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        bias = self.positions[: x.shape[1]].to(dtype)[None]
        needed = (["tokens"] if self.cond_features else []) + (["t"] if self.time_features else [])
        if not needed:
            return None, None, bias
        if ctx is None:
            raise ValueError(f"tarflow is conditional and needs a Context with {needed}")
        ctx.require("tarflow", *needed)
        time = None
        if self.time_features:
            encoded = self.context(ctx, "tarflow", batch=x.shape[0])
            time = self.time_embed(encoded.to(x.dtype)).to(dtype)[:, None, :]
            bias = bias + time
        if not self.cond_features:
            return None, None, bias
        tokens, real = ctx.tokens, ctx.mask
        batch = x.shape[0]
        if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != self.cond_features:
            raise ValueError(
                f"tarflow expected ctx.tokens of shape ({batch}, M, {self.cond_features}), "
                f"got {tuple(tokens.shape)}"
            )
        if real is not None:
            if real.dtype != torch.bool:
                raise TypeError(f"tarflow expected a bool ctx.mask, got dtype {real.dtype}")
            if real.shape != tokens.shape[:2]:
                raise ValueError(
                    f"tarflow expected ctx.mask of shape {tuple(tokens.shape[:2])}, "
                    f"got {tuple(real.shape)}"
                )
            # Zeroed padding cannot leak (not even a NaN) through the masked attention.
            tokens = torch.where(real[..., None], tokens, torch.zeros_like(tokens))
        prefix = self.cond_embed(tokens.to(x.dtype)).to(dtype)
        if time is not None:
            prefix = prefix + time
        return prefix, real, bias

    def _slots(self, previous: Tensor | None, inputs: Tensor, bias: Tensor) -> Tensor:
        """Embeds consecutive data slots, the first reading ``previous`` or the start token.

        Args:
            previous: The token before ``inputs`` (B, 1, C), or None at the sequence start.
            inputs: The tokens read by the other slots (B, n, C), in the input dtype.
            bias: The slots' positional (+ time) embedding (B or 1, n + 1, dim).
        """
        if previous is not None:
            return self.embed(torch.cat([previous, inputs], dim=1)).to(bias.dtype) + bias
        start = self.start.to(bias.dtype).expand(inputs.shape[0], 1, -1)
        return torch.cat([start, self.embed(inputs).to(bias.dtype)], dim=1) + bias

    def _run(
        self,
        h: Tensor,
        cache: KVCache | None,
        start: int,
        mask: Tensor | None,
        is_causal: bool = False,
    ) -> tuple[Tensor, KVCache]:
        """Runs positions ``[start, start + S)`` through all layers; see :meth:`_Layer.forward`."""
        new_cache: KVCache = []
        for index, layer in enumerate(self.transformer):
            h, keys_values = layer(
                h, None if cache is None else cache[index], start, mask, is_causal
            )
            new_cache.append(keys_values)
        return h, new_cache

    def _affine(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Shift and soft-clamped log-scale from transformer outputs, in float32 or wider."""
        with full_precision(h):
            shift, raw = self.head(self.norm(h)).to(h.dtype).chunk(2, dim=-1)
        return shift, soft_clamp(raw, self.scale_bound)

    def _start_cache(
        self, prefix: Tensor | None, real: Tensor | None, z: Tensor, dtype: torch.dtype
    ) -> KVCache | None:
        """The cache an inverse starts from: the prefix's keys/values, room for ``L`` more.

        Without autograd the keys/values are written into buffers preallocated for the whole
        sequence, which saves copying the cache at every step; with autograd the cache is
        concatenated as it grows (None until there is something in it).
        """
        m = 0 if prefix is None else prefix.shape[1]
        cache = None
        if not torch.is_grad_enabled():
            shape = (2, z.shape[0], self.heads, m + z.shape[1], self.dim // self.heads)
            cache = [z.new_empty(shape, dtype=dtype) for _ in self.transformer]
        if m:
            mask = _attention_mask(real, m, 0, m, z.device)
            cache = self._run(prefix, cache, 0, mask)[1]
        return cache

    def _oriented(self, x: Tensor) -> Tensor:
        return x.flip(1) if self.flip else x

    # ----------------------------------------------------------------------------------------
    # The three passes.

    def forward(self, x: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        """Maps data to latent in one parallel pass; returns ``(z, -Σ a)``."""
        self._check(x)
        prefix, real, bias = self._condition(x, ctx)
        xs = self._oriented(x)
        h = self._slots(None, xs[:, :-1], bias)
        m = 0 if prefix is None else prefix.shape[1]
        if m:
            mask = _attention_mask(real, m, 0, m + xs.shape[1], x.device)
            h, _ = self._run(torch.cat([prefix, h], dim=1), None, 0, mask)
        else:  # plain causal attention lets SDPA pick its fused kernels
            h, _ = self._run(h, None, 0, None, is_causal=True)
        shift, log_scale = self._affine(h[:, m:])
        z = (xs.to(shift.dtype) - shift) * torch.exp(-log_scale)
        logdet = -log_scale.sum(dim=(1, 2))
        return self._oriented(z.to(x.dtype)), logdet.to(logdet_dtype(x))

    def inverse(self, y: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        """Maps latent to data with ``inverse_method``; returns ``(x, +Σ a)``."""
        if self.inverse_method == "jacobi":
            return self.inverse_jacobi(y, ctx)
        return self.inverse_kv_cache(y, ctx)

    def inverse_kv_cache(self, z: Tensor, ctx: Context | None = None) -> tuple[Tensor, Tensor]:
        """Exact inverse, one token per step against explicit per-layer key/value caches.

        Args:
            z: Latent tokens, shape ``(B, L, C)``.
            ctx: The context given to the forward.

        Returns:
            ``(x, log|det ∂x/∂z|)``, the log-det of shape ``(B,)``.
        """
        self._check(z)
        prefix, real, bias = self._condition(z, ctx)
        cache = self._start_cache(prefix, real, z, bias.dtype)
        m = 0 if prefix is None else prefix.shape[1]
        zs = self._oriented(z).to(bias.dtype)
        # A single query may see every cached key but padding prefix tokens.
        keys = None if real is None else F.pad(real, (0, zs.shape[1]), value=True)[:, None, None]
        h = self.start.to(bias.dtype) + bias[:, :1].expand(zs.shape[0], 1, -1)
        outputs, log_scales = [], []
        for n in range(zs.shape[1]):
            if n:  # the forward embeds tokens in the input dtype
                h = self.embed(outputs[-1].to(z.dtype)).to(bias.dtype) + bias[:, n : n + 1]
            mask = None if keys is None else keys[..., : m + n + 1]
            h, cache = self._run(h, cache, m + n, mask)
            shift, log_scale = self._affine(h)
            outputs.append(zs[:, n : n + 1] * torch.exp(log_scale) + shift)
            log_scales.append(log_scale)
        x = torch.cat(outputs, dim=1).to(z.dtype)
        logdet = torch.cat(log_scales, dim=1).sum(dim=(1, 2))
        return self._oriented(x), logdet.to(logdet_dtype(z))

    def inverse_jacobi(
        self,
        z: Tensor,
        ctx: Context | None = None,
        *,
        block_size: int | None = None,
        tol: float | None = None,
        max_iters: int | None = None,
        return_iterations: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[int]]:
        """Inverse by block Jacobi iteration: parallel over the tokens of each block.

        Blocks of ``block_size`` tokens are solved in order, with the keys/values of the
        finished ones cached. Within a block, starting from ``x = z``, every iteration
        recomputes ``(a, b)`` of the block's tokens in parallel from the current guess and
        sets ``x = z · exp(a) + b``, until every token changed by less than ``tol``.

        A token whose earlier tokens are all final is final after one more iteration, so
        iterations only recompute the window of tokens from the first unsettled one on. At
        each iteration the window's first token settles (it read only final tokens), and so
        does every later token ``j`` of the window for which all the window's tokens up to
        and including ``j`` changed by less than ``tol`` in that iteration: every guess ``j``
        read (directly or through cached keys/values) is then within ``tol`` of the value
        returned for that token. (A token whose own change is small but whose predecessor
        moved a lot read a stale input and stays in the window.) A block of ``k`` tokens thus
        takes at most ``k`` iterations, and with ``tol=0`` and ``max_iters >= k`` the result
        is exact. To first order, the error against :meth:`inverse_kv_cache` is at most
        ``tol`` times the sum over chains ``i → … → j`` of products of ``|∂x_j/∂x_i|``: about
        ``tol`` for a mildly nonlinear block, a larger multiple where it amplifies changes.

        Args:
            z: Latent tokens, shape ``(B, L, C)``.
            ctx: The context given to the forward.
            block_size: Tokens per block; ``jacobi_block`` if None.
            tol: Largest absolute change that counts as converged; ``jacobi_tol`` if None.
                Under bf16/float16 autocast it is raised to what that precision resolves
                (a few epsilons of ``|z|``), which a finer tolerance could never reach.
            max_iters: Iteration limit per block; ``jacobi_max_iters`` if None.
            return_iterations: Also return the number of iterations run in each block.

        Returns:
            ``(x, log|det ∂x/∂z|)``, and the list of iteration counts per block if asked.
        """
        block_size = self.jacobi_block if block_size is None else block_size
        tol = self.jacobi_tol if tol is None else tol
        max_iters = self.jacobi_max_iters if max_iters is None else max_iters
        if block_size < 1 or max_iters < 1 or not tol >= 0:
            raise ValueError(
                "tarflow Jacobi needs block_size >= 1, max_iters >= 1 and tol >= 0, got "
                f"{block_size}, {max_iters} and {tol}"
            )
        self._check(z)
        tol = max(tol, _resolution_floor(z))
        prefix, real, bias = self._condition(z, ctx)
        cache = self._start_cache(prefix, real, z, bias.dtype)
        m = 0 if prefix is None else prefix.shape[1]
        zs = self._oriented(z).to(bias.dtype)
        outputs, log_scales, iterations = [], [], []
        for first in range(0, zs.shape[1], block_size):
            last = min(first + block_size, zs.shape[1])
            x_block = z_block = zs[:, first:last]
            log_scale_block = torch.zeros_like(z_block)
            settled, iteration = 0, 0  # tokens first .. first + settled - 1 are final
            while settled < last - first and iteration < max_iters:
                iteration += 1
                # Slots [first + settled, last) read tokens [first + settled - 1, last - 1).
                if first + settled == 0:
                    previous = None
                elif settled == 0:
                    previous = outputs[-1][:, -1:].to(z.dtype)
                else:
                    previous = x_block[:, settled - 1 : settled].to(z.dtype)
                inputs = x_block[:, settled : last - first - 1].to(z.dtype)
                h = self._slots(previous, inputs, bias[:, first + settled : last])
                mask = _attention_mask(real, m, m + first + settled, m + last, z.device)
                h, cache = self._run(h, cache, m + first + settled, mask)
                shift, log_scale = self._affine(h)
                update = z_block[:, settled:] * torch.exp(log_scale) + shift
                change = (update - x_block[:, settled:]).abs().amax(dim=(0, 2))
                x_block = torch.cat([x_block[:, :settled], update], dim=1)
                log_scale_block = torch.cat([log_scale_block[:, :settled], log_scale], dim=1)
                # Token j of the window read the guesses of the window's tokens before it, so
                # it is taken as final only when all of them, and j itself, moved by less than
                # tol: its inputs (and its cached keys/values) are then within tol of the final
                # ones. Its own small change alone is not enough: an earlier token that moved a
                # lot means j was computed from a stale input. The window's first token read
                # only final tokens, so it always settles (at least one token per iteration).
                converged = (change < tol).int().cummin(dim=0).values
                settled += max(1, int(converged.sum()))
            iterations.append(iteration)
            outputs.append(x_block)
            log_scales.append(log_scale_block)
        x = self._oriented(torch.cat(outputs, dim=1).to(z.dtype))
        logdet = torch.cat(log_scales, dim=1).sum(dim=(1, 2)).to(logdet_dtype(z))
        return (x, logdet, iterations) if return_iterations else (x, logdet)

    @classmethod
    def example(cls, generator: torch.Generator | None = None):
        block = cls(
            features=3, tokens=6, dim=16, layers=2, heads=2, time_features=8, cond_features=4
        )
        x = torch.randn(2, 6, 3, generator=generator)
        ctx = Context(
            t=torch.rand(2, generator=generator),
            tokens=torch.randn(2, 2, 4, generator=generator),
            mask=torch.tensor([[True, True], [True, False]]),
        )
        return block, x, ctx
