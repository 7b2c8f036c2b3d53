"""Core protocol: Context, Sequential, Inverse, the registry and check_block itself."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from trajflow import BLOCKS, Block, BlockSpec, Context, Inverse, Registry, Sequential
from trajflow.testing import check_block, perturb_parameters


def test_sequential_sums_logdets_and_inverts_in_reverse_order():
    flow = Sequential.from_specs(
        [
            {"name": "affine_coupling", "kwargs": {"features": 4, "hidden_features": [8]}},
            {"name": "lu_linear", "kwargs": {"features": 4}},
            {
                "name": "spline_coupling",
                "kwargs": {"features": 4, "hidden_features": [8], "parity": True},
            },
        ]
    )
    flow = perturb_parameters(flow.double(), 0.2)
    x = torch.randn(5, 4, dtype=torch.float64)
    y, logdet = flow(x)
    expected, total = x, torch.zeros(5, dtype=torch.float64)
    for block in flow.blocks:
        expected, part = block(expected)
        total = total + part
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(logdet, total)
    check_block(flow, x, atol=1e-8)


def test_inverse_swaps_directions_and_shares_parameters():
    block = perturb_parameters(BLOCKS.build("affine_coupling", features=4).double(), 0.2)
    x = torch.randn(3, 4, dtype=torch.float64)
    inverse = block.inv
    assert isinstance(inverse, Inverse) and inverse.inv is block
    torch.testing.assert_close(inverse(x)[0], block.inverse(x)[0])
    assert {id(p) for p in inverse.parameters()} == {id(p) for p in block.parameters()}
    check_block(inverse, x, atol=1e-8)


def test_sequential_rejects_non_blocks():
    with pytest.raises(TypeError, match="Block instances"):
        Sequential(torch.nn.Linear(2, 2))


def test_context_map_and_require():
    ctx = Context(t=torch.rand(4), cond=torch.randn(4, 2))
    assert ctx.map(lambda v: v[:1]).batch_size == 1
    assert Context().batch_size is None
    with pytest.raises(ValueError, match="tokens"):
        ctx.require("my_block", "t", "tokens")


def test_registry_register_get_build_and_aliases():
    registry: Registry[type] = Registry("widget")

    @registry.register("round_widget", aliases=("old_round_widget",))
    class RoundWidget:
        def __init__(self, radius: float = 1.0):
            self.radius = radius

    assert registry.names() == ["round_widget"]
    assert registry.get("old_round_widget") is RoundWidget
    assert registry.build("round_widget", radius=2.0).radius == 2.0
    assert registry.build(BlockSpec(name="round_widget", kwargs={"radius": 3.0})).radius == 3.0
    with pytest.raises(ValueError, match="already registered"):
        registry.register("round_widget")(RoundWidget)
    with pytest.raises(ValueError, match="snake_case"):
        registry.register("RoundWidget")
    with pytest.raises(KeyError, match="known: round_widget"):
        registry.get("square_widget")
    assert registry.check("old_round_widget") == "old_round_widget"
    with pytest.raises(ValueError, match="known: round_widget"):
        registry.check("square_widget")


def test_spec_validation_names_the_field():
    with pytest.raises(ValidationError, match="name"):
        BlockSpec(name="Not Snake", kwargs={})
    with pytest.raises(ValidationError, match="extra"):
        BlockSpec.model_validate({"name": "reverse", "kwarg": {}})


class _WrongLogdet(Block):
    """A deliberately broken block: the log-det misses a factor."""

    def forward(self, x, ctx=None):
        return 2 * x, torch.full((x.shape[0],), 0.5, dtype=x.dtype)

    def inverse(self, y, ctx=None):
        return y / 2, torch.full((y.shape[0],), -0.5, dtype=y.dtype)

    @classmethod
    def example(cls, generator=None):
        return cls(), torch.randn(2, 3, generator=generator), None


class _NotInvertible(_WrongLogdet):
    def inverse(self, y, ctx=None):
        return y, torch.zeros(y.shape[0], dtype=y.dtype)


class _MixesSamples(Block):
    def forward(self, x, ctx=None):
        return x + x.mean(0, keepdim=True), torch.zeros(x.shape[0], dtype=x.dtype)

    def inverse(self, y, ctx=None):
        # Exact inverse of the batch map, but the per-sample log-det (0) is then wrong.
        return y - y.mean(0, keepdim=True) / 2, torch.zeros(y.shape[0], dtype=y.dtype)

    @classmethod
    def example(cls, generator=None):
        return cls(), torch.randn(3, 2, generator=generator), None


@pytest.mark.parametrize(
    "broken, message",
    [
        (_WrongLogdet, "slogdet"),
        (_NotInvertible, "inverse"),
        (_MixesSamples, "other samples"),
    ],
)
def test_check_block_catches_broken_blocks(broken, message):
    block, x, ctx = broken.example(torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match=message):
        check_block(block, x.double(), ctx)
