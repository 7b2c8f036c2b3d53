"""Image blocks: squeeze, conv1x1, image_actnorm, conv_affine_coupling and the multi-scale flow."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trajflow import BLOCKS, BlockSpec, Context, Sequential
from trajflow.blocks import (
    ActNorm,
    Conv1x1,
    ConvAffineCoupling,
    ImageActNorm,
    MultiScale,
    Squeeze,
    glow_levels,
)
from trajflow.blocks.image_coupling import checkerboard
from trajflow.testing import check_block, perturb_parameters

F64 = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    """Layer initialisations draw from the global generator: make every test deterministic."""
    torch.manual_seed(0)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def perturbed(block, scale: float = 0.1, seed: int = 0):
    return perturb_parameters(block.double(), scale=scale, seed=seed)


# --------------------------------------------------------------------------- squeeze
@pytest.mark.parametrize("factor", [2, 3])
def test_squeeze_matches_a_hand_loop(factor):
    x = randn(2, 3, 2 * factor, 3 * factor)
    y, logdet = Squeeze(factor)(x)
    expected = torch.empty(2, 3 * factor**2, 2, 3, dtype=F64)
    for c in range(3):
        for i in range(factor):
            for j in range(factor):
                for h in range(2):
                    for w in range(3):
                        value = x[:, c, h * factor + i, w * factor + j]
                        expected[:, c * factor**2 + i * factor + j, h, w] = value
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    assert logdet.dtype == F64 and not logdet.any()
    x_again, inverse_logdet = Squeeze(factor).inverse(y)
    torch.testing.assert_close(x_again, x, atol=0, rtol=0)
    assert not inverse_logdet.any()


def test_squeeze_rejects_sizes_it_cannot_split():
    with pytest.raises(ValueError, match=r"H and W divisible by 2, got shape \(1, 3, 4, 5\)"):
        Squeeze()(torch.randn(1, 3, 4, 5))
    with pytest.raises(ValueError, match=r"divisible by 3"):
        Squeeze(3)(torch.randn(1, 3, 6, 4))
    with pytest.raises(ValueError, match=r"C divisible by 4, got shape \(1, 6, 2, 2\)"):
        Squeeze().inverse(torch.randn(1, 6, 2, 2))
    with pytest.raises(ValueError, match="factor >= 2"):
        Squeeze(1)


# --------------------------------------------------------------------------- conv1x1
def test_conv1x1_is_conv2d_with_the_assembled_weight():
    block = perturbed(Conv1x1(channels=5, seed=2), scale=0.3)
    x = randn(2, 5, 3, 4)
    y, logdet = block(x)
    weight = block.weight()
    torch.testing.assert_close(y, F.conv2d(x, weight[:, :, None, None]))
    # log|det| of the whole map: H·W copies of W.
    torch.testing.assert_close(logdet, 12 * torch.linalg.slogdet(weight)[1].expand(2))
    x_again, inverse_logdet = block.inverse(y)
    torch.testing.assert_close(x_again, F.conv2d(y, torch.linalg.inv(weight)[:, :, None, None]))
    torch.testing.assert_close(x_again, x)
    torch.testing.assert_close(inverse_logdet, -logdet)


def test_conv1x1_keeps_the_lu_parameterisation():
    block = Conv1x1(channels=4, seed=0)
    names = {name for name, _ in block.named_parameters()}
    assert names == {"lower", "upper", "log_diagonal"}
    assert {"permutation", "sign"} <= {name for name, _ in block.named_buffers()}
    assert torch.linalg.slogdet(block.weight())[1].abs() < 1e-5  # starts as a rotation


# --------------------------------------------------------------------------- image_actnorm
def test_image_actnorm_initialises_per_channel_over_batch_and_pixels():
    norm = ImageActNorm(channels=3)
    x = torch.tensor([1.0, -2.0, 5.0])[None, :, None, None] + torch.tensor([0.5, 2.0, 3.0])[
        None, :, None, None
    ] * torch.randn(64, 3, 6, 6)
    z, logdet = norm(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(logdet, 36 * norm.log_scale.sum().expand(64))
    before = norm.bias.detach().clone()
    norm(x + 10)  # only the first batch initialises
    torch.testing.assert_close(norm.bias, before)


def test_image_actnorm_is_actnorm_on_every_pixel():
    image, vector = perturbed(ImageActNorm(3)), perturbed(ActNorm(3))
    vector.load_state_dict(image.state_dict())
    x = randn(2, 3, 4, 5)
    y, logdet = image(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)
    expected, _ = vector(pixels)
    torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(-1, 3), expected)
    torch.testing.assert_close(logdet, 20 * vector(pixels[:1])[1].expand(2))


# --------------------------------------------------------------------------- coupling
def test_checkerboard_pattern():
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(checkerboard(3, 4), expected)
    assert torch.equal(checkerboard(3, 4, parity=True), ~expected)


@pytest.mark.parametrize("parity", [False, True])
def test_checkerboard_coupling_keeps_exactly_the_kept_pixels(parity):
    block = perturbed(ConvAffineCoupling(3, mask="checkerboard", parity=parity, hidden_channels=8))
    x = randn(2, 3, 5, 4)
    y, _ = block(x)
    keep = checkerboard(5, 4, parity).expand_as(x)
    torch.testing.assert_close(y[keep], x[keep], atol=0, rtol=0)
    assert ((y - x)[~keep].abs() > 1e-6).all()


@pytest.mark.parametrize("parity", [False, True])
def test_channel_coupling_keeps_half_of_the_channels(parity):
    block = perturbed(ConvAffineCoupling(5, mask="channel", parity=parity, hidden_channels=8))
    x = randn(2, 5, 3, 3)
    y, _ = block(x)
    kept = slice(3, 5) if parity else slice(0, 2)  # ⌊5/2⌋ = 2 kept channels
    moved = slice(0, 3) if parity else slice(2, 5)
    torch.testing.assert_close(y[:, kept], x[:, kept], atol=0, rtol=0)
    assert ((y - x)[:, moved].abs() > 1e-6).all()


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
def test_new_coupling_is_the_identity(mask):
    block = ConvAffineCoupling(4, mask=mask, hidden_channels=8, time_features=8)
    x = torch.randn(3, 4, 6, 6)
    y, logdet = block(x, Context(t=torch.rand(3)))
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert logdet.abs().max() == 0


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
@pytest.mark.parametrize("parity", [False, True])
def test_coupling_logdet_is_the_jacobian_slogdet(mask, parity):
    block = ConvAffineCoupling(
        4, mask=mask, parity=parity, hidden_channels=6, context_features=2, time_features=4
    )
    block = perturbed(block, scale=0.3, seed=int(parity))
    ctx = Context(t=torch.rand(2, dtype=F64), cond=randn(2, 2, seed=1))
    report = check_block(block, randn(2, 4, 4, 3), ctx, atol=1e-9)
    assert report.max_logdet_error < 1e-9


def test_coupling_depends_on_time_and_steps_only_when_time_conditioned():
    block = perturbed(ConvAffineCoupling(4, mask="channel", hidden_channels=8, time_features=8))
    x = randn(2, 4, 4, 4)
    t = torch.tensor([0.2, 0.7], dtype=F64)
    y, _ = block(x, Context(t=t))
    y_later, _ = block(x, Context(t=t + 0.1))
    y_steps, _ = block(x, Context(t=t, steps=torch.tensor([4, 4])))
    assert (y - y_later).abs().max() > 1e-4 and (y - y_steps).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"needs context fields \['t'\]"):
        block(x, Context())
    unconditional = perturbed(ConvAffineCoupling(4, mask="channel", hidden_channels=8))
    assert not unconditional.conditional
    torch.testing.assert_close(unconditional(x)[0], unconditional(x, Context(t=t))[0])


def test_coupling_keeps_affine_maths_and_logdet_in_float32_under_bf16_autocast():
    block = perturbed(ConvAffineCoupling(4, mask="checkerboard", hidden_channels=8)).float()
    x = torch.randn(2, 4, 6, 6)
    reference, reference_logdet = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = block(x)
        x_again, inverse_logdet = block.inverse(y)
    assert logdet.dtype == inverse_logdet.dtype == torch.float32
    assert y.dtype == torch.float32
    torch.testing.assert_close(logdet, reference_logdet, atol=0.1, rtol=0)
    torch.testing.assert_close(y, reference, atol=0.05, rtol=0)
    # The conditioner runs in bf16 but both directions see the same kept part: exact inverse.
    torch.testing.assert_close(x_again, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-5, rtol=0)
    # Inside a flow under autocast a coupling receives bf16 activations: it returns bf16 but
    # still sums its log-det in float32.
    x_bf16 = x.bfloat16()
    reference, reference_logdet = block(x_bf16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = block(x_bf16)
    assert y.dtype == torch.bfloat16 and logdet.dtype == torch.float32
    torch.testing.assert_close(logdet, reference_logdet, atol=0.1, rtol=0)
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0)


def test_coupling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mask 'checkerboard' or 'channel', got 'stripes'"):
        ConvAffineCoupling(4, mask="stripes")
    with pytest.raises(ValueError, match=r"mask='channel' needs channels >= 2, got 1"):
        ConvAffineCoupling(1, mask="channel")
    with pytest.raises(ValueError, match="hidden_channels >= 1"):
        ConvAffineCoupling(4, hidden_channels=0)
    with pytest.raises(ValueError, match="scale_bound"):
        ConvAffineCoupling(4, scale_bound=0)


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "block",
    [Squeeze(), Conv1x1(3), ImageActNorm(3), ConvAffineCoupling(3, hidden_channels=4)],
    ids=lambda block: type(block).__name__,
)
def test_image_blocks_name_the_expected_layout(block):
    for direction in (block.forward, block.inverse):
        with pytest.raises(ValueError, match=r"expected shape \(B, C, H, W\), got \(2, 3, 4\)"):
            direction(torch.randn(2, 3, 4))
        with pytest.raises(TypeError, match="floating-point"):
            direction(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    if not isinstance(block, Squeeze):
        with pytest.raises(ValueError, match=r"with C=3, got \(2, 4, 4, 4\)"):
            block(torch.randn(2, 4, 4, 4))


# --------------------------------------------------------------------------- multi-scale
def _manual_multiscale(flow: MultiScale, x: torch.Tensor) -> list[torch.Tensor]:
    """Glow's recipe written out: squeeze, level flow, split (first half goes on)."""
    first, second = flow.levels
    h, _ = first(Squeeze()(x)[0])
    kept, factored = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]
    last, _ = second(Squeeze()(kept)[0])
    return [factored, last]


def test_multiscale_factors_out_half_the_channels_at_each_level():
    flow = perturbed(MultiScale(3, glow_levels(levels=2, depth=1, hidden_channels=8)), 0.2)
    x = randn(2, 3, 8, 4)
    y, _ = flow(x)
    assert y.shape == x.shape
    pieces = flow.latents(y)
    assert [tuple(p.shape[1:]) for p in pieces] == [(6, 4, 2), (24, 2, 1)]
    for piece, expected in zip(pieces, _manual_multiscale(flow, x), strict=True):
        torch.testing.assert_close(piece, expected)


def test_multiscale_without_blocks_is_the_identity():
    x = randn(2, 2, 8, 8)
    y, logdet = MultiScale(2, levels=[[], [], []])(x)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert not logdet.any()


GLOW_JSON = """
[
  {"name": "multiscale", "kwargs": {"channels": 2, "levels": [
    [{"name": "image_actnorm"}, {"name": "conv1x1", "kwargs": {"seed": 3}},
     {"name": "conv_affine_coupling",
      "kwargs": {"mask": "checkerboard", "hidden_channels": 6, "time_features": 4}}],
    [{"name": "image_actnorm"}, {"name": "conv1x1"},
     {"name": "conv_affine_coupling",
      "kwargs": {"mask": "channel", "parity": true, "hidden_channels": 6, "time_features": 4}}]
  ]}},
  {"name": "conv1x1", "kwargs": {"channels": 2}}
]
"""


def test_multiscale_flow_from_a_json_spec_is_exact():
    flow = Sequential.from_specs(json.loads(GLOW_JSON)).double()
    x, ctx = randn(2, 2, 4, 4), Context(t=torch.tensor([0.1, 0.8], dtype=F64))
    flow(x, ctx)  # initialises the ActNorms from data
    flow = perturb_parameters(flow, scale=0.2, seed=1)
    report = check_block(flow, x, ctx, atol=1e-9)
    assert report.max_logdet_error < 1e-9 and flow.conditional
    # The same spec through pydantic's BlockSpec gives the same architecture.
    single = BLOCKS.build(BlockSpec.model_validate_json(json.dumps(json.loads(GLOW_JSON)[0])))
    assert set(single.state_dict()) == set(flow[0].state_dict())


def test_glow_levels_are_json_and_build_a_working_flow():
    specs = json.loads(json.dumps(glow_levels(levels=2, depth=2, hidden_channels=4)))
    flow = BLOCKS.build("multiscale", channels=1, levels=specs).double()
    # Initialise the ActNorms on a batch, as in training: from one image, the last level
    # would see a single pixel per channel and scale it by 1/eps.
    flow(randn(16, 1, 4, 4, seed=1))
    flow = perturbed(flow, 0.2)
    names = [block.registered_name for block in flow.levels[0]]
    assert names == ["image_actnorm", "conv1x1", "conv_affine_coupling"] * 2
    assert [spec["kwargs"]["seed"] for spec in specs[1] if spec["name"] == "conv1x1"] == [2, 3]
    assert [block.parity for block in flow.levels[1] if hasattr(block, "parity")] == [False, True]
    check_block(flow, randn(1, 1, 4, 4), atol=1e-9)


def test_multiscale_rejects_bad_specs_and_sizes():
    with pytest.raises(ValueError, match=r"H and W divisible by 4, got shape \(1, 2, 4, 6\)"):
        MultiScale(2, levels=[[], []])(torch.randn(1, 2, 4, 6))
    with pytest.raises(ValueError, match=r"with C=2, got \(1, 3, 4, 4\)"):
        MultiScale(2, levels=[[]])(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"level 1 has 16 channels after squeezing.*channels=8"):
        MultiScale(2, levels=[[], [{"name": "conv1x1", "kwargs": {"channels": 8}}]])
    with pytest.raises(ValueError, match="list of lists of block specs"):
        MultiScale(2, levels=[])
    with pytest.raises(ValueError, match="level 0 must be a list of block specs"):
        MultiScale(2, levels=["conv1x1"])
    with pytest.raises(ValueError, match="needs a Context with"):
        MultiScale(2, glow_levels(levels=1, depth=1, time_features=4))(torch.randn(1, 2, 2, 2))


def test_multiscale_logdet_stays_float32_under_bf16_autocast():
    flow = MultiScale(3, glow_levels(levels=2, depth=1, hidden_channels=8, time_features=4))
    x, ctx = torch.randn(4, 3, 4, 4), Context(t=torch.rand(4))
    flow(x, ctx)  # initialise the ActNorms
    flow = perturb_parameters(flow, scale=0.1, seed=2)
    reference, reference_logdet = flow(x, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = flow(x, ctx)
        _, inverse_logdet = flow.inverse(z, ctx)
    assert logdet.dtype == inverse_logdet.dtype == torch.float32
    # The log-dets are sums over 48 entries: bf16 accumulation would be off by whole units.
    torch.testing.assert_close(logdet, reference_logdet, atol=0.05, rtol=0)
    torch.testing.assert_close(z.float(), reference, atol=0.25, rtol=0.05)
