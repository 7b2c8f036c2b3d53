"""Fuzzed public entry points (issue 6, item 8): bad input ends in a ValueError or TypeError
whose message names the argument and what was expected, never in NaN output or an error
from deep inside torch; good input gives finite output.

Covered: ``NTM.sample``, ``NTM.loss``, ``NTM.data_bound``, the ``NTM`` constructor,
``guided_gaussian``, ``FlowMatching.loss``/``sample`` and ``ModelConfig``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from trajflow import BLOCKS, NTM, PREDICTORS, FlowMatching, Sequential
from trajflow.config import ModelConfig
from trajflow.ntm import guided_gaussian
from trajflow.testing import perturb_parameters

F64 = torch.float64
D, FC = 3, 4
FUZZ = settings(max_examples=30, deadline=None)


def build_ntm(cond_features: int = 0) -> NTM:
    torch.manual_seed(0)
    predictor = PREDICTORS.build(
        "mlp", features=D, hidden_features=[8], time_features=8, cond_features=cond_features
    )
    transporter = Sequential(
        BLOCKS.build("affine_coupling", features=D, hidden_features=[8], time_features=8)
    )
    return perturb_parameters(NTM(transporter, predictor).double(), scale=0.2)


def build_fm(cond_features: int = 0) -> FlowMatching:
    torch.manual_seed(0)
    net = PREDICTORS.build(
        "mlp", features=D, hidden_features=[8], target="velocity", cond_features=cond_features
    )
    return FlowMatching(net).double()


NTM_MODEL, NTM_CONDITIONAL, FM_MODEL = build_ntm(), build_ntm(FC), build_fm()


def rejected(call, *fragments: str) -> str:
    """Runs ``call``; it must raise a ValueError/TypeError naming every fragment."""
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    message = str(error.value)
    assert "expected" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------- strategies
#: Not an integer >= 1: zero, negatives, floats (even integral ones), text, None, bools.
BAD_COUNTS = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
)
#: Not a finite number >= 0.
BAD_NON_NEGATIVE = st.one_of(
    st.floats(max_value=-1e-9, allow_infinity=True),
    st.sampled_from([math.nan, math.inf]),
    st.text(max_size=3),
    st.none(),
)
#: Not a finite number in (0, 1).
BAD_UNIT = st.one_of(
    st.floats(max_value=0.0, allow_infinity=True),
    st.floats(min_value=1.0, allow_infinity=True),
    st.just(math.nan),
    st.text(max_size=3),
)


@st.composite
def bad_batches(draw, event: tuple[int, ...] = (D,)):
    """``(x, fragment)``: a broken data batch and what its error message must contain."""
    kind = draw(st.sampled_from(["nonfinite", "empty", "dtype", "shape", "rank", "type"]))
    batch = draw(st.integers(1, 6))
    x = torch.randn(batch, *event, dtype=F64, generator=torch.Generator().manual_seed(batch))
    if kind == "nonfinite":
        bad = draw(st.lists(st.integers(0, x.numel() - 1), min_size=1, max_size=4, unique=True))
        values = draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1))
        x.view(-1)[bad] = torch.tensor(
            [values[i % len(values)] for i in range(len(bad))], dtype=F64
        )
        return x, "expected finite values"
    if kind == "empty":
        return x[:0], "at least one sample"
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
        return x.to(dtype), "dtype" if dtype.is_floating_point else "floating-point"
    if kind == "shape":
        width = draw(st.integers(1, 6).filter(lambda w: w != event[-1]))
        return torch.randn(batch, *event[:-1], width, dtype=F64), "of shape (B, 3)"
    if kind == "rank":
        return draw(st.sampled_from([x[0], x[:, None], x[..., None]])), "of shape (B, 3)"
    return draw(st.sampled_from([x.tolist(), x.numpy(), None])), "torch.Tensor"


# --------------------------------------------------------------------------- NTM.sample
@FUZZ
@given(n=BAD_COUNTS)
def test_ntm_sample_rejects_bad_n(n):
    rejected(lambda: NTM_MODEL.sample(n, steps=2), "NTM.sample", "n to be an integer >= 1")


def test_ntm_sample_zero_and_negative_n_name_the_problem():
    """Found in the issue: these raised an obscure reshape RuntimeError."""
    for n in (0, -1):
        message = rejected(lambda n=n: NTM_MODEL.sample(n), "n to be an integer >= 1")
        assert message.endswith(f"got {n}")


@FUZZ
@given(steps=BAD_COUNTS)
def test_ntm_sample_rejects_bad_steps(steps):
    rejected(lambda: NTM_MODEL.sample(2, steps=steps), "steps to be an integer >= 1")


@FUZZ
@given(temperature=BAD_NON_NEGATIVE)
def test_ntm_sample_rejects_bad_temperature(temperature):
    rejected(lambda: NTM_MODEL.sample(2, temperature=temperature), "temperature", ">= 0")


@FUZZ
@given(t_min=BAD_UNIT)
def test_ntm_sample_rejects_bad_t_min(t_min):
    rejected(lambda: NTM_MODEL.sample(2, t_min=t_min), "t_min", "> 0 and < 1")


@FUZZ
@given(cfg=BAD_NON_NEGATIVE)
def test_ntm_sample_rejects_bad_guidance_weights(cfg):
    y = torch.randn(2, FC, dtype=F64)
    rejected(lambda: NTM_CONDITIONAL.sample(2, cfg=cfg, y=y), "guidance weight cfg", ">= 0")


@FUZZ
@given(
    n=st.integers(1, 5) | st.sampled_from([np.int64(3), torch.tensor(2)]),
    steps=st.integers(1, 12),
    temperature=st.floats(0, 2),
    t_min=st.floats(1e-6, 0.999),
    cfg=st.floats(0, 5),
)
def test_ntm_sample_on_good_arguments_is_finite_or_names_t_min(n, steps, temperature, t_min, cfg):
    """Any valid-looking call gives finite samples, except a t_min above the grid's first
    level, which the grid rejects by name."""
    y = torch.randn(int(n), FC, dtype=F64, generator=torch.Generator().manual_seed(0))
    if t_min >= 1 / steps:  # the uniform grid's t_1
        expected = f"expected t_min below t_1 = {1 / steps:.4g}"
        rejected(lambda: NTM_CONDITIONAL.sample(n, steps, cfg, y, t_min=t_min), expected)
        return
    x = NTM_CONDITIONAL.sample(n, steps, cfg, y, temperature=temperature, t_min=t_min)
    assert x.shape == (int(n), D) and bool(torch.isfinite(x).all())


def test_ntm_sample_checks_the_condition():
    y = torch.randn(2, FC, dtype=F64)
    y[1, 2] = math.nan
    rejected(lambda: NTM_CONDITIONAL.sample(2, y=y), "finite values in y", "1 NaN")
    rejected(lambda: NTM_CONDITIONAL.sample(3, y=y.nan_to_num()), "y of shape (B, F) with B=3")
    rejected(lambda: NTM_MODEL.sample(2, y=y.nan_to_num()), "cond_features=0")


# --------------------------------------------------------------------------- NTM.loss / data_bound
@FUZZ
@given(case=bad_batches())
def test_ntm_loss_rejects_bad_data(case):
    x, fragment = case
    rejected(lambda: NTM_MODEL.loss(x), "NTM.loss", fragment)


@FUZZ
@given(case=bad_batches())
def test_ntm_data_bound_rejects_bad_data(case):
    x, fragment = case
    rejected(lambda: NTM_MODEL.data_bound(x), "NTM.data_bound", fragment)


def test_data_bound_on_nan_or_inf_data_names_the_problem():
    """Found in the issue: this returned NaN without a word."""
    for value, count in ((math.nan, "1 NaN and 0 infinite"), (math.inf, "0 NaN and 1 infinite")):
        x = torch.zeros(4, D, dtype=F64)
        x[2, 1] = value
        rejected(lambda x=x: NTM_MODEL.data_bound(x), "finite values in x", count)


@FUZZ
@given(
    argument=st.sampled_from(["steps", "samples", "quantization_levels", "t0"]),
    value=st.one_of(st.integers(-3, 1), st.floats(allow_nan=True), st.text(max_size=2)),
)
def test_ntm_data_bound_rejects_bad_settings(argument, value):
    x = torch.randn(4, D, dtype=F64)
    if argument == "quantization_levels" and isinstance(value, int) and value >= 2:
        value = 1
    if argument in ("steps", "samples") and isinstance(value, int) and value >= 1:
        value = 0
    if argument == "t0" and isinstance(value, (int, float)) and 0 < value < 1:
        value = 1.5
    rejected(lambda: NTM_MODEL.data_bound(x, **{argument: value}), f"expected {argument}")


@FUZZ
@given(
    y=st.sampled_from(["nan", "short", "wide"]),
    step=st.one_of(st.integers(max_value=-1), st.floats(), st.none()),
)
def test_ntm_loss_checks_the_condition_and_the_step(y, step):
    x0 = torch.randn(4, D, dtype=F64)
    condition = torch.randn(4, FC, dtype=F64)
    if y == "nan":
        condition[0, 0] = math.nan
        rejected(lambda: NTM_CONDITIONAL.loss(x0, condition), "finite values in y")
    else:
        condition = condition[:3] if y == "short" else torch.randn(4, FC + 1, dtype=F64)
        rejected(lambda: NTM_CONDITIONAL.loss(x0, condition), "y of shape (B, F)")
    rejected(lambda: NTM_MODEL.loss(x0, step=step), "step to be an integer >= 0")
    rejected(lambda: NTM_MODEL.loss(x0, mode="stepwise"), "mode 'end_to_end' or 'pairwise'")


@FUZZ
@given(batch=st.integers(1, 6), scale=st.floats(1e-3, 10))
def test_ntm_loss_and_bound_on_good_data_are_finite(batch, scale):
    x = scale * torch.randn(batch, D, dtype=F64, generator=torch.Generator().manual_seed(batch))
    assert bool(torch.isfinite(NTM_MODEL.loss(x).nll).all())
    assert bool(torch.isfinite(NTM_MODEL.data_bound(x, steps=2).log_likelihood).all())


# --------------------------------------------------------------------------- NTM constructor
@FUZZ
@given(cfg_dropout=st.one_of(BAD_UNIT.filter(lambda v: v != 0.0), st.floats(max_value=-1e-9)))
def test_ntm_rejects_bad_cfg_dropout(cfg_dropout):
    predictor = NTM_MODEL.predictor
    rejected(lambda: NTM(None, predictor, cfg_dropout=cfg_dropout), "cfg_dropout")


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ((torch.nn.Linear(3, 3), NTM_MODEL.predictor), "transporter to be a Block"),
        ((None, torch.nn.Linear(3, 3)), "predictor to be a Predictor"),
        ((None, NTM_MODEL.predictor, {"steps": [2]}), "schedule to be a ScheduleConfig"),
    ],
    ids=["transporter", "predictor", "schedule"],
)
def test_ntm_constructor_rejects_wrong_types(arguments, fragment):
    rejected(lambda: NTM(*arguments), fragment)
    rejected(lambda: NTM(None, NTM_MODEL.predictor, mode="stepwise"), "mode 'end_to_end' or")


# --------------------------------------------------------------------------- guided_gaussian
@FUZZ
@given(weight=BAD_NON_NEGATIVE)
def test_guided_gaussian_rejects_bad_weights(weight):
    ones = torch.ones(3, dtype=F64)
    rejected(lambda: guided_gaussian(ones, ones, ones, 2 * ones, weight), "guidance weight w")


@FUZZ
@given(weight=st.floats(0, 1e6), ratio=st.floats(1e-3, 1e3))
def test_guided_gaussian_is_finite_for_valid_weights(weight, ratio):
    mean_c, mean_u = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    std = torch.full((4,), 0.5, dtype=F64)
    mean, scale = guided_gaussian(mean_c, std, mean_u, ratio * std, weight)
    assert bool(torch.isfinite(mean).all() and (scale > 0).all())


# --------------------------------------------------------------------------- FlowMatching
@FUZZ
@given(case=bad_batches())
def test_flow_matching_loss_rejects_bad_data(case):
    x, fragment = case
    rejected(lambda: FM_MODEL.loss(x), "FlowMatching.loss", fragment)


@FUZZ
@given(
    argument=st.sampled_from(["n", "steps", "t_min", "method"]),
    value=st.one_of(st.integers(-2, 0), st.floats(allow_nan=True), st.text(max_size=3)),
)
def test_flow_matching_sample_rejects_bad_arguments(argument, value):
    arguments = {"n": 2, "steps": 2, "method": "ancestral", argument: value}
    if argument == "t_min" and isinstance(value, (int, float)) and 0 < value < 1:
        arguments["t_min"] = 1.0
    fragment = f"expected {argument}"
    rejected(lambda: FM_MODEL.sample(**arguments), fragment)


@FUZZ
@given(n=st.integers(1, 4), steps=st.integers(1, 6), method=st.sampled_from(["euler", "heun"]))
def test_flow_matching_sample_on_good_arguments_is_finite(n, steps, method):
    x = FM_MODEL.sample(n, steps=steps, method=method)
    assert x.shape == (n, D) and bool(torch.isfinite(x).all())


def test_flow_matching_constructor_checks():
    net = FM_MODEL.net
    rejected(lambda: FlowMatching(torch.nn.Linear(2, 2)), "net to be a Predictor")
    rejected(lambda: FlowMatching(net, cfg_dropout=1.0), "cfg_dropout")
    rejected(lambda: FlowMatching(net, schedule={"steps": [2]}), "schedule to be a ScheduleConfig")


# --------------------------------------------------------------------------- NormalizingFlow
@FUZZ
@given(n=BAD_COUNTS, temperature=st.floats(0, 2) | BAD_NON_NEGATIVE)
def test_normalizing_flow_sample_rejects_bad_arguments(n, temperature):
    from trajflow import NormalizingFlow

    flow = NormalizingFlow(Sequential(BLOCKS.build("affine_coupling", features=2)), shape=(2,))
    rejected(lambda: flow.sample(n, temperature=temperature), "NormalizingFlow.sample")
    if isinstance(temperature, float) and 0 <= temperature < math.inf:
        assert flow.sample(3, temperature=temperature).shape == (3, 2)
    else:
        rejected(lambda: flow.sample(3, temperature=temperature), "temperature", ">= 0")


# --------------------------------------------------------------------------- ModelConfig
PREDICTOR = {"name": "mlp", "kwargs": {"features": D, "hidden_features": [8]}}
COUPLING = {"name": "affine_coupling", "kwargs": {"features": D, "time_features": 8}}
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


@FUZZ
@given(name=NAMES.filter(lambda name: name not in PREDICTORS))
def test_model_config_unknown_predictor_lists_the_known_ones(name):
    with pytest.raises(ValidationError) as error:
        ModelConfig(predictor={"name": name})
    message = str(error.value)
    assert "predictor" in message and f"unknown predictor {name!r}" in message
    assert "mlp, trajectory_transformer" in message


@FUZZ
@given(name=NAMES.filter(lambda name: name not in BLOCKS))
def test_model_config_unknown_block_lists_the_known_ones(name):
    with pytest.raises(ValidationError) as error:
        ModelConfig(predictor=PREDICTOR, transporter=[COUPLING, {"name": name}])
    message = str(error.value)
    assert "transporter" in message and f"unknown block {name!r}" in message
    assert "affine_coupling" in message


@FUZZ
@given(keyword=NAMES.filter(lambda name: name not in ("features", "hidden_features")))
def test_model_config_unknown_keywords_are_validation_errors(keyword):
    """A keyword the registered class does not take fails at validation, with its signature,
    not later at build time."""
    import inspect

    from trajflow.predictors import MLPPredictor

    if keyword in inspect.signature(MLPPredictor).parameters:
        return
    spec = {"name": "mlp", "kwargs": {**PREDICTOR["kwargs"], keyword: 1}}
    with pytest.raises(ValidationError, match=r"predictor[\s\S]*does not take[\s\S]*mlp\("):
        ModelConfig(predictor=spec)
    block = {"name": "affine_coupling", "kwargs": {**COUPLING["kwargs"], keyword + "_x": 1}}
    with pytest.raises(ValidationError, match=r"transporter[\s\S]*affine_coupling"):
        ModelConfig(predictor=PREDICTOR, transporter=[block])


@FUZZ
@given(
    field=st.sampled_from(["cfg_dropout", "mode", "kind", "schedule", "finetune"]),
    value=st.one_of(st.floats(allow_nan=True), st.text(max_size=4), st.integers(-5, 5)),
)
def test_model_config_invalid_fields_name_the_field(field, value):
    raw = {"predictor": PREDICTOR, field: value}
    if field == "cfg_dropout" and isinstance(value, (int, float)) and 0 <= value < 1:
        raw[field] = 1.5
    with pytest.raises(ValidationError, match=field):
        ModelConfig.model_validate(raw)


def test_model_config_ntm_settings_on_flow_matching_are_rejected():
    predictor = {"name": "mlp", "kwargs": {**PREDICTOR["kwargs"], "target": "velocity"}}
    with pytest.raises(ValidationError, match="transporter is an NTM setting"):
        ModelConfig(kind="flow_matching", predictor=predictor, transporter=[COUPLING])
