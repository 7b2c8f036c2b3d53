"""The image blocks on ``(B, C, H, W)``; docs/blocks.md includes this file section by section.

Run from the repository root: ``python docs/examples/image_flow.py``. Every section checks
what it claims with an ``assert``, so a behaviour change fails the docs tests.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from trajflow import BLOCKS, BlockSpec, Context, Sequential
from trajflow.blocks import glow_levels
from trajflow.testing import check_block

torch.manual_seed(0)

# --8<-- [start:squeeze]
squeeze = BLOCKS.build("squeeze")  # factor=2
x = torch.arange(16.0).reshape(1, 1, 4, 4)
y, logdet = squeeze(x)  # (1, 4, 2, 2): each 2x2 patch becomes 4 channels
assert y.shape == (1, 4, 2, 2) and y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
assert torch.equal(squeeze.inverse(y)[0], x) and not logdet.any()
# --8<-- [end:squeeze]

# --8<-- [start:conv1x1]
conv = BLOCKS.build("conv1x1", channels=3, seed=0)
x = torch.randn(2, 3, 8, 8)
y, logdet = conv(x)
weight = conv.weight()  # W = P L U, shape (C, C)
assert torch.allclose(y, F.conv2d(x, weight[:, :, None, None]), atol=1e-5)
assert torch.allclose(logdet, 64 * torch.linalg.slogdet(weight)[1], atol=1e-4)  # H·W·log|det W|
# --8<-- [end:conv1x1]

# --8<-- [start:image_actnorm]
norm = BLOCKS.build("image_actnorm", channels=3)
y, logdet = norm(5 + 2 * torch.randn(16, 3, 8, 8))  # the first forward call initialises
assert y.mean((0, 2, 3)).abs().max() < 1e-4 and y.std((0, 2, 3)).sub(1).abs().max() < 1e-3
assert torch.allclose(logdet, 64 * norm.log_scale.sum().expand(16))
# --8<-- [end:image_actnorm]

# --8<-- [start:conv_affine_coupling]
coupling = BLOCKS.build(
    "conv_affine_coupling", channels=3, mask="checkerboard", hidden_channels=32, time_features=16
)
with torch.no_grad():
    coupling.conditioner.last.weight.normal_(std=0.01)  # leave the identity start, for the demo
ctx = Context(t=torch.rand(2))
x = torch.randn(2, 3, 8, 8)
y, logdet = coupling(x, ctx)  # logdet in float32, also under bf16 autocast
kept = (torch.arange(8)[:, None] + torch.arange(8)) % 2 == 0  # parity=False keeps (h + w) even
assert torch.equal(y[:, :, kept], x[:, :, kept])
x_again, minus_logdet = coupling.inverse(y, ctx)
# --8<-- [end:conv_affine_coupling]
assert torch.allclose(x_again, x, atol=1e-5) and torch.allclose(minus_logdet, -logdet)

# --8<-- [start:multiscale]
spec = """
{"name": "multiscale", "kwargs": {"channels": 3, "levels": [
  [{"name": "image_actnorm"}, {"name": "conv1x1", "kwargs": {"seed": 0}},
   {"name": "conv_affine_coupling", "kwargs": {"mask": "channel", "hidden_channels": 32}}],
  [{"name": "image_actnorm"}, {"name": "conv1x1", "kwargs": {"seed": 1}},
   {"name": "conv_affine_coupling", "kwargs": {"mask": "channel", "parity": true}}]
]}}
"""
flow = BLOCKS.build(BlockSpec.model_validate_json(spec))  # channels filled in per level
x = torch.randn(16, 3, 8, 8)
z, logdet = flow(x)  # same shape as x: the factored-out halves stay in z
z_0, z_last = flow.latents(z)  # (16, 6, 4, 4) factored out at level 0, (16, 24, 2, 2)
x_again, minus_logdet = flow.inverse(z)
# --8<-- [end:multiscale]
assert z.shape == x.shape and z_0.shape == (16, 6, 4, 4) and z_last.shape == (16, 24, 2, 2)
assert torch.allclose(x_again, x, atol=1e-4) and torch.allclose(minus_logdet, -logdet)

# --8<-- [start:glow_levels]
glow = Sequential.from_specs(
    [
        {"name": "multiscale", "kwargs": {"channels": 3, "levels": glow_levels(levels=3, depth=2)}},
    ]
)
print(json.dumps(glow_levels(levels=1, depth=1)[0][2]))  # the specs are plain JSON
# --8<-- [end:glow_levels]
x = torch.randn(8, 3, 8, 8)
glow(x)  # initialise the ActNorms on a batch before checking
report = check_block(glow.double(), x[:2].double(), jacobian=False)
assert report.max_roundtrip_error < 1e-10
