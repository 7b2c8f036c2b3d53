"""Coupling blocks: identity start, token sequences, halves, bf16, torch.compile."""

from __future__ import annotations

import pytest
import torch

from trajflow import BLOCKS, Context
from trajflow.testing import check_block, perturb_parameters

COUPLINGS = ["additive_coupling", "affine_coupling", "spline_coupling"]


@pytest.mark.parametrize("name", COUPLINGS)
def test_a_new_coupling_is_the_identity(name):
    block = BLOCKS.build(name, features=6, hidden_features=(16,))
    x = torch.randn(8, 6)
    y, logdet = block(x)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", COUPLINGS)
@pytest.mark.parametrize("parity", [False, True])
def test_only_one_half_moves_and_it_depends_on_the_other(name, parity):
    block = perturb_parameters(
        BLOCKS.build(name, features=5, hidden_features=(16,), parity=parity).double(), 0.3
    )
    x = torch.randn(4, 5, dtype=torch.float64)
    y, _ = block(x)
    kept = slice(3, 5) if parity else slice(0, 2)
    moved = slice(0, 3) if parity else slice(2, 5)
    torch.testing.assert_close(y[:, kept], x[:, kept], atol=0, rtol=0)
    assert (y[:, moved] - x[:, moved]).abs().max() > 1e-3
    jacobian = torch.autograd.functional.jacobian(lambda v: block(v)[0], x[:1])[0, :, 0]
    assert jacobian[moved, kept].abs().max() > 1e-6  # the moving half reads the kept half
    assert jacobian[moved, moved].triu(1).abs().max() == 0  # elementwise transform


@pytest.mark.parametrize("name", COUPLINGS)
def test_token_sequences_with_time_and_vector_context(name):
    block = perturb_parameters(
        BLOCKS.build(
            name, features=4, context_features=2, time_features=8, hidden_features=(16,)
        ).double(),
        0.2,
    )
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    ctx = Context(t=torch.rand(3, dtype=torch.float64), cond=torch.randn(3, 2, dtype=torch.float64))
    check_block(block, x, ctx, atol=1e-8)


def test_context_with_the_wrong_width_names_the_expected_shape():
    block = BLOCKS.build("affine_coupling", features=4, context_features=3)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        block(torch.randn(2, 4), Context(cond=torch.randn(2, 5)))
    with pytest.raises(ValueError, match="batch size"):
        block(torch.randn(2, 4), Context(cond=torch.randn(3, 3)))


def test_affine_log_scale_is_soft_clamped():
    block = BLOCKS.build("affine_coupling", features=2, hidden_features=(4,), scale_bound=2.0)
    with torch.no_grad():
        block.conditioner[-1].bias.fill_(1e4)
    _, logdet = block(torch.randn(5, 2))
    assert torch.all(logdet <= 2.0 + 1e-5)


@pytest.mark.parametrize("name", COUPLINGS)
def test_bf16_autocast_keeps_a_float32_logdet(name):
    block = perturb_parameters(BLOCKS.build(name, features=4, hidden_features=(16,)), 0.1)
    x = torch.randn(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _y, logdet = block(x)
    assert logdet.dtype == torch.float32
    _reference, reference_logdet = block(x)
    torch.testing.assert_close(logdet, reference_logdet, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", COUPLINGS)
def test_compiles_with_fullgraph(name):
    block, x, ctx = BLOCKS.get(name).example(torch.Generator().manual_seed(0))
    block = perturb_parameters(block, 0.1)
    expected, expected_logdet = block(x, ctx)
    forward = torch.compile(block, fullgraph=True)
    inverse = torch.compile(block.inverse, fullgraph=True)
    y, logdet = forward(x, ctx)
    x_again, _ = inverse(y, ctx)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet, expected_logdet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_again, x, atol=1e-4, rtol=1e-4)
