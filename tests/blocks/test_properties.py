"""Properties every registered block must have; parametrised over BLOCKS.names() automatically.

Each test draws a seed and a batch size with hypothesis, builds the block's example,
perturbs its parameters away from the (often identity) initialisation and checks it in the
dtype chosen with ``--dtype`` (float64 by default).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajflow
from trajflow import BLOCKS, Block, Context
from trajflow.testing import cast_context, check_block, perturb_parameters

NAMES = BLOCKS.names()
PROPERTY_SETTINGS = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def drawn_example(
    name: str, seed: int, batch: int, dtype: torch.dtype, device: torch.device
) -> tuple[Block, torch.Tensor, Context | None]:
    """The registered example, perturbed, re-batched to ``batch`` rows drawn from its input."""
    generator = torch.Generator().manual_seed(seed)
    block, x, ctx = BLOCKS.get(name).example(generator)
    rows = torch.randint(0, x.shape[0], (batch,), generator=generator)
    x = x[rows] + 0.1 * torch.randn(x[rows].shape, generator=generator)
    ctx = None if ctx is None else ctx.map(lambda v: v[rows])
    block = perturb_parameters(block.to(device, dtype), scale=0.1, seed=seed)
    return block, x.to(device, dtype), cast_context(ctx, dtype, device)


def perturbed_context(ctx: Context, seed: int) -> Context:
    generator = torch.Generator().manual_seed(seed + 1)

    def shift(value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        return value + 0.3 * noise.to(value)

    return ctx.map(shift)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_invertible_with_exact_logdet(name, seed, batch, dtype, device, tolerance):
    block, x, ctx = drawn_example(name, seed, batch, dtype, device)
    report = check_block(block, x, ctx, atol=tolerance if dtype == torch.float64 else 1e-3)
    assert report.max_roundtrip_error <= 1e-3  # the check raised already if it were larger


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16))
def test_permuting_the_batch_permutes_the_outputs(name, seed, dtype, device, tolerance):
    block, x, ctx = drawn_example(name, seed, 4, dtype, device)
    permutation = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    permuted_ctx = None if ctx is None else ctx.map(lambda v: v[permutation.to(v.device)])
    with torch.no_grad():
        y, logdet = block(x, ctx)
        y_permuted, logdet_permuted = block(x[permutation], permuted_ctx)
        x_back, inverse_logdet = block.inverse(y, ctx)
        x_back_permuted, inverse_logdet_permuted = block.inverse(y[permutation], permuted_ctx)
    torch.testing.assert_close(y_permuted, y[permutation], atol=tolerance, rtol=0)
    torch.testing.assert_close(logdet_permuted, logdet[permutation], atol=tolerance, rtol=0)
    torch.testing.assert_close(x_back_permuted, x_back[permutation], atol=tolerance, rtol=0)
    torch.testing.assert_close(
        inverse_logdet_permuted, inverse_logdet[permutation], atol=tolerance, rtol=0
    )


@pytest.mark.parametrize("name", NAMES)
@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**16))
def test_conditional_blocks_depend_on_their_context(name, seed, dtype, device):
    block, x, ctx = drawn_example(name, seed, 3, dtype, device)
    if not block.conditional:
        assert ctx is None, f"{name}'s example passes a context the block ignores"
        return
    with torch.no_grad():
        y, _ = block(x, ctx)
        y_other, _ = block(x, perturbed_context(ctx, seed))
        x_back_other, _ = block.inverse(y, perturbed_context(ctx, seed))
    # Some samples may sit entirely on a spline's identity tails: ask for a change somewhere.
    assert (y - y_other).abs().max() > 1e-6
    assert (x_back_other - x).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"context|Context|ctx"):
        block(x, None)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, dtype, device):
    block, x, ctx = drawn_example(name, 0, 3, dtype, device)
    fresh, _, _ = BLOCKS.get(name).example(torch.Generator().manual_seed(123))
    fresh = fresh.to(device, dtype)
    fresh.load_state_dict(copy.deepcopy(block.state_dict()))
    with torch.no_grad():
        expected, expected_logdet = block(x, ctx)
        actual, actual_logdet = fresh(x, ctx)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    torch.testing.assert_close(actual_logdet, expected_logdet, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_nan_inputs_are_not_silently_made_finite(name, dtype, device):
    block, x, ctx = drawn_example(name, 0, 3, dtype, device)
    x = x.clone()
    x.view(x.shape[0], -1)[0, 0] = float("nan")
    for direction in (block.forward, block.inverse):
        try:
            with torch.no_grad():
                y, logdet = direction(x, ctx)
        except ValueError:
            continue
        corrupted = torch.isnan(y[0]).any() or torch.isnan(logdet[0])
        assert corrupted, f"{name} turned a NaN input into a finite output"
        assert torch.isfinite(y[1:]).all(), f"{name} let one sample's NaN reach another"


@pytest.mark.parametrize("name", NAMES)
def test_integer_input_is_a_type_error(name, device):
    block, x, ctx = BLOCKS.get(name).example(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="floating-point"):
        block(x.to(torch.int64), ctx)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_is_a_value_error(name):
    block, x, ctx = BLOCKS.get(name).example(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"expected shape"):
        block(x.reshape(-1), ctx)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if "features" in inspect.signature(BLOCKS.get(n)).parameters]
)
def test_wrong_feature_size_names_the_expected_shape(name):
    block, x, ctx = BLOCKS.get(name).example(torch.Generator().manual_seed(0))
    wider = torch.cat([x, x[..., :1]], dim=-1)
    with pytest.raises(ValueError, match=rf"={x.shape[-1]}|{x.shape[-1]}"):
        block(wider, ctx)


def _concrete_blocks(cls: type[Block]) -> set[type[Block]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= _concrete_blocks(sub)
        if (
            not inspect.isabstract(sub)
            and not sub.composite
            and sub.__module__.startswith("trajflow")
        ):
            found.add(sub)
    return found


def test_every_concrete_block_is_registered():
    unregistered = {cls.__qualname__ for cls in _concrete_blocks(Block)} - {
        cls.__qualname__ for cls in BLOCKS.values()
    }
    assert not unregistered, f"concrete blocks missing from BLOCKS: {sorted(unregistered)}"


def test_the_registered_names_are_the_documented_ones():
    expected = {
        "actnorm",
        "additive_coupling",
        "affine_coupling",
        "fixed_permutation",
        "lu_linear",
        "reverse",
        "spline_coupling",
        "tarflow",
    }
    assert expected <= set(NAMES)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="affine_coupling"):
        BLOCKS.get("affine_couplin")


def test_build_rejects_unknown_keywords_with_the_signature():
    with pytest.raises(TypeError, match="features"):
        BLOCKS.build({"name": "affine_coupling", "kwargs": {"features": 4, "widht": 3}})


def test_public_api_is_importable_from_the_package():
    for name in ["BLOCKS", "Block", "Context", "Sequential", "Inverse", "Registry", "BlockSpec"]:
        assert hasattr(trajflow, name)
