"""One short example per registered block; docs/blocks.md includes it section by section.

Run from the repository root: ``python docs/examples/blocks_tour.py``. Every section checks
what it claims with an ``assert``, so a behaviour change fails the docs tests.
"""

from __future__ import annotations

import torch

from trajflow import BLOCKS, Context, Sequential

torch.manual_seed(0)

# --8<-- [start:additive_coupling]
block = BLOCKS.build("additive_coupling", features=6, hidden_features=[32, 32])
x = torch.randn(8, 6)
y, logdet = block(x)
assert torch.equal(logdet, torch.zeros(8))  # volume-preserving
# --8<-- [end:additive_coupling]

# --8<-- [start:affine_coupling]
block = BLOCKS.build(
    "affine_coupling", features=4, context_features=3, time_features=16, scale_bound=3.0
)
ctx = Context(t=torch.rand(8), cond=torch.randn(8, 3))
x = torch.randn(8, 10, 4)  # token sequences (B, L, C) work too; split over channels
y, logdet = block(x, ctx)  # logdet: (8,), summed over tokens and channels
x_again, minus_logdet = block.inverse(y, ctx)
# --8<-- [end:affine_coupling]
assert torch.allclose(x_again, x, atol=1e-5) and torch.allclose(minus_logdet, -logdet)

# --8<-- [start:spline_coupling]
block = BLOCKS.build("spline_coupling", features=4, bins=8, bound=3.0, parity=True)
x = 4 * torch.randn(8, 4)  # some entries beyond ±3 pass through the identity tails
y, logdet = block(x)
assert torch.equal(y[:, 2:], x[:, 2:])  # parity=True keeps the last half, transforms the first
# --8<-- [end:spline_coupling]

# --8<-- [start:spline_functions]
from trajflow.blocks import rational_quadratic_spline, spline_knots  # noqa: E402

raw = torch.randn(5, 3 * 8 - 1)  # per point: 8 widths, 8 heights, 7 interior derivatives
knots = spline_knots(raw[:, :8], raw[:, 8:16], raw[:, 16:], bound=3.0)
points = torch.randn(5)
values, log_slopes = rational_quadratic_spline(points, *knots)
points_again, _ = rational_quadratic_spline(values, *knots, inverse=True)
# --8<-- [end:spline_functions]
assert torch.allclose(points_again, points, atol=1e-5)

# --8<-- [start:lu_linear]
block = BLOCKS.build("lu_linear", features=3, seed=0)
x = torch.randn(2, 16, 3)  # a 4x4 image with 3 channels, as 16 tokens
y, logdet = block(x)  # logdet = 16 · log|det W| for every sample
_, log_abs_det = torch.linalg.slogdet(block.weight())
assert torch.allclose(logdet, 16 * log_abs_det.expand(2), atol=1e-5)
# --8<-- [end:lu_linear]

# --8<-- [start:actnorm]
block = BLOCKS.build("actnorm", features=2)
y, logdet = block(3 + 5 * torch.randn(512, 2))  # the first forward call initialises
assert bool(block.initialized) and y.std(0).sub(1).abs().max() < 1e-3
# --8<-- [end:actnorm]

# --8<-- [start:reverse]
tokens = BLOCKS.build("reverse", dim=1)  # reverse the token order; dim=-1 reverses features
x = torch.randn(2, 5, 3)
y, logdet = tokens(x)
assert torch.equal(y, x.flip(1)) and torch.equal(logdet, torch.zeros(2))
# --8<-- [end:reverse]

# --8<-- [start:fixed_permutation]
block = BLOCKS.build("fixed_permutation", features=6, seed=1)
x = torch.randn(4, 6)
y, _ = block(x)
assert torch.equal(y, x[:, block.index]) and torch.equal(block.inverse(y)[0], x)
# --8<-- [end:fixed_permutation]

# --8<-- [start:tarflow]
block = BLOCKS.build("tarflow", features=4, tokens=16, dim=64, heads=4, time_features=16)
with torch.no_grad():
    block.head.weight.normal_(std=0.02)  # leave the identity start, for the demonstration
    ctx = Context(t=torch.rand(3))
    x = torch.randn(3, 16, 4)
    z, logdet = block(x, ctx)  # one parallel pass
    x_exact, _ = block.inverse_kv_cache(z, ctx)  # 16 sequential steps
    x_jacobi, _, iterations = block.inverse_jacobi(z, ctx, block_size=8, return_iterations=True)
print(f"Jacobi iterations per block of 8 tokens: {iterations}")
# --8<-- [end:tarflow]
assert torch.allclose(x_exact, x, atol=1e-4) and torch.allclose(x_jacobi, x, atol=1e-3)

# --8<-- [start:tarflow_stack]
transporter = Sequential.from_specs(
    [
        {"name": "tarflow", "kwargs": {"features": 4, "tokens": 16, "flip": flip}}
        for flip in (False, True)  # alternate the scan direction
    ]
)
# --8<-- [end:tarflow_stack]
assert len(transporter) == 2
