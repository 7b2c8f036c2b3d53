"""Gaussian predictors: shapes, zero-initialised heads, level causality, conditioning, errors.

Layout reminder: the predictor reads ``K`` levels at once, level index ``k`` holding the input
``u_{k+1}`` (index 0 is the cleanest input) and predicting level ``k``. The prediction for level
``k`` may read inputs of levels ``≥ k`` (``causal``) or ``== k`` (``markov``), never cleaner ones.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trajflow.nn import sinusoidal_embedding
from trajflow.predictors import PREDICTORS, MLPPredictor, TrajectoryTransformer
from trajflow.testing import perturb_parameters

F64 = torch.float64
FEW = settings(max_examples=3, deadline=None)
B, K, L, C, D, M, FC = 2, 4, 3, 2, 3, 3, 5


def build(name: str, perturb: bool = True, seed: int = 0, **kwargs):
    if name == "mlp":
        kwargs = {"features": D, "hidden_features": [16, 16], "time_features": 8, **kwargs}
    else:
        kwargs = {
            "features": C,
            "tokens": L,
            "dim": 16,
            "layers": 2,
            "heads": 2,
            "time_features": 8,
            **kwargs,
        }
    torch.manual_seed(seed)
    net = PREDICTORS.build(name, **kwargs).double()
    return perturb_parameters(net, scale=0.3, seed=seed) if perturb else net


def inputs(name: str, seed: int = 0, batch: int = B, levels: int = K):
    generator = torch.Generator().manual_seed(seed)
    event = (D,) if name == "mlp" else (L, C)
    u = torch.randn(batch, levels, *event, generator=generator, dtype=F64)
    t_in = 0.1 + 0.9 * torch.rand(batch, levels, generator=generator, dtype=F64)
    t_out = t_in * torch.rand(batch, levels, generator=generator, dtype=F64)
    steps = torch.full((batch,), levels)
    return u, t_in, t_out, steps


def condition(name: str, seed: int = 1, batch: int = B, tokens: int = M):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, FC) if name == "mlp" else (batch, tokens, FC)
    return torch.randn(shape, generator=generator, dtype=F64)


NAMES = PREDICTORS.names()


def test_both_predictors_are_registered():
    assert set(NAMES) >= {"mlp", "trajectory_transformer"}
    assert PREDICTORS.get("mlp") is MLPPredictor
    assert PREDICTORS.get("trajectory_transformer") is TrajectoryTransformer


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("target", ["x0", "velocity"])
def test_output_shapes_and_event_shape(name, target):
    net = build(name, target=target)
    u, t_in, t_out, steps = inputs(name)
    head, delta = net(u, t_in, t_out, steps)
    assert head.shape == u.shape and delta.shape == u.shape
    assert head.dtype == F64 and delta.dtype == F64
    assert net.event_shape == tuple(u.shape[2:])
    assert net.target == target
    assert bool(torch.isfinite(head).all() and torch.isfinite(delta).all())


@pytest.mark.parametrize("name", NAMES)
def test_delta_and_target_time_paths_are_zero_at_init(name):
    net = build(name, perturb=False)
    u, t_in, t_out, steps = inputs(name)
    head, delta = net(u, t_in, t_out, steps)
    assert delta.abs().max().item() == 0.0
    # The (t_out, T) path starts at zero: the head equals the plain velocity-net call.
    plain, plain_delta = net(u, t_in)
    torch.testing.assert_close(head, plain, rtol=0, atol=1e-12)
    assert plain_delta.abs().max().item() == 0.0
    other, _ = net(u, t_in, 0.3 * t_out, steps + 12)
    torch.testing.assert_close(head, other, rtol=0, atol=1e-12)
    # ... while the head is not trivial: it reads u and t_in.
    assert not torch.allclose(head, net(u + 0.5, t_in)[0])
    assert not torch.allclose(head, net(u, 0.5 * t_in)[0])


@pytest.mark.parametrize("name", NAMES)
def test_target_time_and_steps_matter_after_perturbation(name):
    net = build(name)
    u, t_in, t_out, steps = inputs(name)
    head, delta = net(u, t_in, t_out, steps)
    for changed in (net(u, t_in, 0.5 * t_out, steps), net(u, t_in, t_out, steps * 4)):
        assert not torch.allclose(head, changed[0])
        assert not torch.allclose(delta, changed[1])
    assert delta.abs().max().item() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_rows_of_the_batch_are_independent(name):
    net = build(name)
    u, t_in, t_out, steps = inputs(name)
    head, delta = net(u, t_in, t_out, steps)
    u2 = u.clone()
    u2[1] += 1.0
    head2, delta2 = net(u2, t_in, t_out, steps)
    torch.testing.assert_close(head2[0], head[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(delta2[0], delta[0], rtol=0, atol=1e-12)
    assert not torch.allclose(head2[1], head[1])


# --------------------------------------------------------------------------- the δ head
TF = 8  # time_features of build()


def embed(values: torch.Tensor) -> torch.Tensor:
    """The documented time embedding, per entry: ``(...,) -> (..., TF)``."""
    return sinusoidal_embedding(values.reshape(-1), TF).reshape(*values.shape, TF)


def only_delta_columns(net, start: int, stop: int, seed: int = 0) -> torch.Tensor:
    """Zeroes the δ head but for random weights on input columns ``[start, stop)``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(net.delta_head.weight.shape, generator=generator, dtype=F64)
    with torch.no_grad():
        net.delta_head.weight.zero_()
        net.delta_head.bias.zero_()
        net.delta_head.weight[:, start:stop] = weight[:, start:stop]
    return weight[:, start:stop]


@pytest.mark.parametrize("name", NAMES)
def test_delta_head_reads_the_t_in_and_target_embeddings(name):
    """δ = W [h, emb(t_in), emb(t_out) + emb(T / 1000)] + b: each time block by hand."""
    net = build(name, perturb=False)
    u, t_in, t_out, steps = inputs(name)
    trunk = net.delta_head.in_features - 2 * TF

    def per_token(value):  # (B, K, out) broadcast over the transformer's tokens
        return value if name == "mlp" else value[:, :, None, :]

    weight = only_delta_columns(net, trunk, trunk + TF)
    expected = per_token(embed(t_in) @ weight.T)
    torch.testing.assert_close(net(u, t_in, t_out, steps)[1], expected.expand_as(u))
    torch.testing.assert_close(net(u, t_in)[1], expected.expand_as(u))  # velocity call
    assert expected.abs().max() > 1e-2

    weight = only_delta_columns(net, trunk + TF, trunk + 2 * TF, seed=1)
    target = embed(t_out) + embed((steps.to(F64) / 1000)[:, None].expand_as(t_in))
    expected = per_token(target @ weight.T)
    torch.testing.assert_close(net(u, t_in, t_out, steps)[1], expected.expand_as(u))
    assert net(u, t_in)[1].abs().max() == 0  # no (t_out, T): that block reads zeros
    assert expected.abs().max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_delta_depends_on_the_step_when_only_the_delta_head_learned(name):
    """What finetuning with no_delta_mean leaves: a flow-matching net (zero (t_out, T) and δ
    heads) whose δ head alone moved. δ must still follow t_out and T (issue 6, item 4)."""
    net = build(name)
    with torch.no_grad():
        for parameter in [*net.delta_head.parameters(), *net.target_time.parameters()]:
            parameter.zero_()
    perturb_parameters(net.delta_head, scale=0.3, seed=5)
    u, t_in, t_out, steps = inputs(name)
    delta = net(u, t_in, t_out, steps)[1]
    for other_t_out, other_steps in ((0.5 * t_out, steps), (t_out, steps * 2)):
        changed = net(u, t_in, other_t_out, other_steps)[1]
        assert (changed - delta).abs().max() > 1e-3


# --------------------------------------------------------------------------- level causality
def level_dependence(net, u, t_in, t_out, steps, y=None) -> torch.Tensor:
    """``changed[k, j]``: whether output level ``k`` changes when the input of level ``j`` does."""
    head, delta = net(u, t_in, t_out, steps, y)
    levels = u.shape[1]
    changed = torch.zeros(levels, levels, dtype=torch.bool)
    for j in range(levels):
        bumped = u.clone()
        bumped[:, j] += torch.randn(
            bumped[:, j].shape, generator=torch.Generator().manual_seed(j), dtype=F64
        )
        head_j, delta_j = net(bumped, t_in, t_out, steps, y)
        for k in range(levels):
            difference = max(
                (head_j[:, k] - head[:, k]).abs().max().item(),
                (delta_j[:, k] - delta[:, k]).abs().max().item(),
            )
            changed[k, j] = difference > 1e-10
    return changed


@pytest.mark.parametrize("level_attention", ["markov", "causal"])
@pytest.mark.parametrize("cond", [False, True])
@FEW
@given(seed=st.integers(0, 2**10))
def test_trajectory_transformer_level_causality(level_attention, cond, seed):
    net = build(
        "trajectory_transformer",
        seed=seed,
        level_attention=level_attention,
        cond_features=FC if cond else 0,
    )
    u, t_in, t_out, steps = inputs("trajectory_transformer", seed)
    y = condition("trajectory_transformer", seed) if cond else None
    changed = level_dependence(net, u, t_in, t_out, steps, y)
    k, j = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    # Never reads cleaner inputs (j < k); always reads its own input (j == k).
    assert not bool(changed[j < k].any()), changed
    assert bool(changed[j == k].all()), changed
    if level_attention == "markov":
        assert not bool(changed[j > k].any()), changed  # nor noisier ones
    else:
        assert bool(changed[j > k].all()), changed  # every noisier level matters


def test_mlp_is_markov_over_levels():
    net = build("mlp")
    changed = level_dependence(net, *inputs("mlp"))
    assert torch.equal(changed, torch.eye(K, dtype=torch.bool))


@pytest.mark.parametrize("level_attention", ["markov", "causal"])
@pytest.mark.parametrize("cond", [False, True])
def test_level_k_equals_the_suffix_pass_the_sampler_uses(level_attention, cond):
    """Prediction ``k`` from the parallel pass equals the pass over levels ``k, …, K-1`` alone
    (``causal``) or over level ``k`` alone (``markov``): what NTM.sample feeds per step."""
    net = build(
        "trajectory_transformer", level_attention=level_attention, cond_features=FC if cond else 0
    )
    u, t_in, t_out, steps = inputs("trajectory_transformer")
    y = condition("trajectory_transformer") if cond else None
    head, delta = net(u, t_in, t_out, steps, y)
    for k in range(K):
        stop = K if level_attention == "causal" else k + 1
        part = net(u[:, k:stop], t_in[:, k:stop], t_out[:, k:stop], steps, y)
        torch.testing.assert_close(part[0][:, 0], head[:, k], rtol=0, atol=1e-10)
        torch.testing.assert_close(part[1][:, 0], delta[:, k], rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- markov with a prompt
def block_mask_reference(net, u, t_in, t_out, steps, y, y_mask=None, drop=None):
    """The markov pass with a prompt computed the quadratic way: every level in one sequence
    behind the prompt tokens, a block mask keeping levels apart (what the fold replaced)."""
    batch, levels = t_in.shape
    time, target = net.embed_times(t_in, t_out, steps)
    h = net.input(u) + net.positions + (net.time(time) + net.target_time(target))[:, :, None]
    condition = net.null_condition(y, batch, drop, u)
    prefix = condition.shape[1]
    if drop is not None:  # a dropped prompt is one null token
        first = torch.arange(prefix) == 0
        kept = y_mask if y_mask is not None else torch.ones(batch, prefix, dtype=torch.bool)
        y_mask = torch.where(drop[:, None], first[None, :], kept)
    sequence = torch.cat([net.condition(condition), h.flatten(1, 2)], dim=1)
    size = prefix + levels * L
    level_of = torch.arange(levels).repeat_interleave(L)
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[prefix:, prefix:] = level_of[:, None] == level_of[None, :]
    mask[:prefix, prefix:] = False
    mask = mask[None, None]
    if y_mask is not None:
        keys = torch.cat([y_mask, torch.ones(batch, levels * L, dtype=torch.bool)], dim=1)
        mask = (mask & keys[:, None, None, :]) | torch.eye(size, dtype=torch.bool)
    for layer in net.layers:
        sequence = layer(sequence, None, 0, mask)[0]
    h = net.norm(sequence[:, prefix:]).unflatten(1, (levels, L))
    times = torch.cat([time, target], dim=-1)[:, :, None].expand(-1, -1, L, -1)
    return net.mean_head(h), net.delta_head(torch.cat([h, times], dim=-1))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    levels=st.integers(1, 5),
    tokens=st.integers(1, 4),
    masked=st.booleans(),
    dropped=st.booleans(),
    grad=st.booleans(),
)
def test_markov_prompt_fold_matches_the_block_mask(seed, levels, tokens, masked, dropped, grad):
    """Folding levels into the batch (prompt keys/values shared per level) computes what the
    block-mask sequence computes, with padding, prompt dropout, and with or without autograd
    (the cache is concatenated or written in place)."""
    net = build("trajectory_transformer", seed=seed % 7, cond_features=FC)
    batch = 3
    u, t_in, t_out, steps = inputs("trajectory_transformer", seed, batch=batch, levels=levels)
    y = condition("trajectory_transformer", seed, batch=batch, tokens=tokens)
    generator = torch.Generator().manual_seed(seed)
    y_mask = torch.rand(batch, tokens, generator=generator) < 0.6 if masked else None
    drop = torch.rand(batch, generator=generator) < 0.5 if dropped else None
    with torch.set_grad_enabled(grad):
        head, delta = net(u, t_in, t_out, steps, y, y_mask, drop)
        expected_head, expected_delta = block_mask_reference(
            net, u, t_in, t_out, steps, y, y_mask, drop
        )
    torch.testing.assert_close(head, expected_head, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(delta, expected_delta, rtol=1e-9, atol=1e-10)
    real = torch.ones(batch, tokens, dtype=torch.bool) if y_mask is None else y_mask.clone()
    real[:, 0] |= drop if drop is not None else False  # a dropped prompt reads the null token
    if grad and bool(real.any()):  # gradients reach the prompt through the shared keys/values
        (head.square().sum() + delta.sum()).backward()
        assert net.condition.weight.grad.abs().max() > 0


def test_markov_prompt_attention_cost_is_linear_in_levels(monkeypatch):
    """No attention call sees more keys than one level and the prompt: M + L, whatever K."""
    net = build("trajectory_transformer", cond_features=FC)
    levels, tokens = 6, 4
    u, t_in, t_out, steps = inputs("trajectory_transformer", levels=levels)
    y = condition("trajectory_transformer", tokens=tokens)
    keys = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        keys.append(key.shape[-2])
        return attention(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    net(u, t_in, t_out, steps, y)
    assert keys and max(keys) == tokens + L, keys


# --------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("name", NAMES)
def test_condition_changes_the_output(name):
    net = build(name, cond_features=FC)
    u, t_in, t_out, steps = inputs(name)
    y = condition(name)
    head, delta = net(u, t_in, t_out, steps, y)
    head2, delta2 = net(u, t_in, t_out, steps, y + 1.0)
    assert not torch.allclose(head, head2) and not torch.allclose(delta, delta2)
    # Only the rows whose condition changed.
    y3 = y.clone()
    y3[1] += 1.0
    head3, _ = net(u, t_in, t_out, steps, y3)
    torch.testing.assert_close(head3[0], head[0], rtol=0, atol=1e-12)
    assert not torch.allclose(head3[1], head[1])


@pytest.mark.parametrize("level_attention", ["markov", "causal"])
def test_padding_tokens_are_ignored(level_attention):
    net = build("trajectory_transformer", cond_features=FC, level_attention=level_attention)
    u, t_in, t_out, steps = inputs("trajectory_transformer")
    y = condition("trajectory_transformer")
    y_mask = torch.tensor([[True, True, False], [True, False, False]])
    head, delta = net(u, t_in, t_out, steps, y, y_mask)
    y_padding = y.clone()
    y_padding[~y_mask] = 100.0 * torch.randn(int((~y_mask).sum()), FC, dtype=F64)
    head2, delta2 = net(u, t_in, t_out, steps, y_padding, y_mask)
    torch.testing.assert_close(head2, head, rtol=0, atol=1e-10)
    torch.testing.assert_close(delta2, delta, rtol=0, atol=1e-10)
    # ... and equal to the prompt without the padding at all.
    for row, length in enumerate((2, 1)):
        alone = net(
            u[row : row + 1],
            t_in[row : row + 1],
            t_out[row : row + 1],
            steps[:1],
            y[row : row + 1, :length],
        )
        torch.testing.assert_close(alone[0][0], head[row], rtol=0, atol=1e-10)
    # A real token does matter.
    y_real = y.clone()
    y_real[0, 0] += 1.0
    assert not torch.allclose(net(u, t_in, t_out, steps, y_real, y_mask)[0][0], head[0])
    # A fully padded prompt is still finite (no empty attention rows).
    empty = torch.zeros_like(y_mask)
    assert bool(torch.isfinite(net(u, t_in, t_out, steps, y, empty)[0]).all())


def null_output(net, u, t_in, t_out, steps):
    return net(u, t_in, t_out, steps, None)


@pytest.mark.parametrize(
    "name", ["mlp", pytest.param("trajectory_transformer", id="transformer-one-token")]
)
def test_dropped_rows_equal_the_null_condition(name):
    net = build(name, cond_features=FC)
    u, t_in, t_out, steps = inputs(name)
    y = condition(name, tokens=1)
    drop = torch.tensor([True, False])
    head, delta = net(u, t_in, t_out, steps, y, drop=drop)
    null_head, null_delta = null_output(net, u, t_in, t_out, steps)
    cond_head, _ = net(u, t_in, t_out, steps, y)
    torch.testing.assert_close(head[0], null_head[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(delta[0], null_delta[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(head[1], cond_head[1], rtol=0, atol=1e-12)
    assert not torch.allclose(null_head[1], cond_head[1])
    # The null condition is a learned parameter: it moves the output.
    with torch.no_grad():
        net.null.add_(1.0)
    assert not torch.allclose(net(u, t_in, t_out, steps, y, drop=drop)[0][0], head[0])


@pytest.mark.parametrize("level_attention", ["markov", "causal"])
def test_dropped_rows_equal_the_null_condition_for_multi_token_prompts(level_attention):
    net = build("trajectory_transformer", cond_features=FC, level_attention=level_attention)
    u, t_in, t_out, steps = inputs("trajectory_transformer")
    y = condition("trajectory_transformer", tokens=M)
    y_mask = torch.tensor([[True, True, False], [True, True, True]])
    drop = torch.tensor([True, True])
    head, _ = net(u, t_in, t_out, steps, y, y_mask, drop)
    null_head, _ = null_output(net, u, t_in, t_out, steps)
    torch.testing.assert_close(head, null_head, rtol=0, atol=1e-10)


def test_dropped_rows_do_not_depend_on_the_prompt():
    net = build("trajectory_transformer", cond_features=FC)
    u, t_in, t_out, steps = inputs("trajectory_transformer")
    y = condition("trajectory_transformer")
    drop = torch.tensor([True, True])
    head = net(u, t_in, t_out, steps, y, drop=drop)[0]
    torch.testing.assert_close(net(u, t_in, t_out, steps, -y, drop=drop)[0], head)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_name_the_expected_shape(name):
    net = build(name, perturb=False, cond_features=FC)
    u, t_in, _, _ = inputs(name)
    event = r"\('B', 'K', 3\)" if name == "mlp" else r"\('B', 'K', 3, 2\)"
    with pytest.raises(ValueError, match=f"expected u of shape {event}"):
        net(u[..., :1], t_in)
    with pytest.raises(ValueError, match=f"expected u of shape {event}"):
        net(u[:, 0], t_in)
    with pytest.raises(ValueError, match=r"expected times of shape \(B, K\) = \(2, 4\)"):
        net(u, t_in[:, :2])
    expected_y = r"\(B, F\)" if name == "mlp" else r"\(B, M, F\)"
    y = condition(name)
    with pytest.raises(ValueError, match=f"expected y of shape {expected_y} with B=2, F=5"):
        net(u, t_in, y=y[..., :2])
    with pytest.raises(ValueError, match=f"expected y of shape {expected_y}"):
        net(u, t_in, y=y[:1])


@pytest.mark.parametrize("name", NAMES)
def test_condition_given_to_an_unconditional_predictor_raises(name):
    net = build(name, perturb=False)
    u, t_in, _, _ = inputs(name)
    with pytest.raises(ValueError, match="cond_features=0"):
        net(u, t_in, y=condition(name))


def test_unknown_predictor_lists_known_names():
    with pytest.raises(KeyError, match="mlp, trajectory_transformer"):
        PREDICTORS.build("unet", features=2)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("mlp", {"features": 2, "target": "eps"}, r"target must be one of \('x0', 'velocity'\)"),
        ("mlp", {"features": 2, "time_features": 7}, "time_features must be an even number"),
        ("mlp", {"features": 2, "hidden_features": []}, "at least one hidden layer"),
        (
            "trajectory_transformer",
            {"features": 2, "tokens": 3, "level_attention": "full"},
            "level_attention must be 'markov' or 'causal'",
        ),
        (
            "trajectory_transformer",
            {"features": 2, "tokens": 3, "dim": 10, "heads": 4},
            r"dim \(10\) must be divisible by heads \(4\)",
        ),
    ],
)
def test_bad_constructor_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PREDICTORS.build(name, **kwargs)


def test_build_rejects_unknown_keyword_with_signature():
    with pytest.raises(TypeError, match="expected mlp"):
        PREDICTORS.build("mlp", features=2, width=3)


def test_bad_prompt_masks_name_what_was_expected():
    net = build("trajectory_transformer", perturb=False, cond_features=FC)
    u, t_in, _, _ = inputs("trajectory_transformer")
    y = condition("trajectory_transformer")
    with pytest.raises(
        ValueError, match=r"expected y_mask of shape \(B, M\) = \(2, 3\), got \(2, 2\)"
    ):
        net(u, t_in, y=y, y_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"expected a bool y_mask tensor, got torch\.float64"):
        net(u, t_in, y=y, y_mask=torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="y_mask without y"):
        net(u, t_in, y_mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "drop", [torch.ones(3, dtype=torch.bool), torch.ones(2), [True, False]], ids=str
)
def test_bad_drop_names_what_was_expected(name, drop):
    net = build(name, perturb=False, cond_features=FC)
    u, t_in, _, _ = inputs(name)
    with pytest.raises(ValueError, match=r"expected drop to be a bool tensor of shape \(2,\)"):
        net(u, t_in, y=condition(name), drop=drop)
