"""The text-to-image benchmark: a smoke run writes a complete JSON; its parts are right."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from trajflow.core import Context
from trajflow_t2i.data import make_split
from trajflow_t2i.model import TextToImage

ROOT = Path(__file__).resolve().parents[2]
TARGET_NAMES = [
    "NTM T=4 accuracy - FM Euler 50 accuracy",
    "NTM T=4 Frechet / FM Euler 50 Frechet",
    "FM Euler 50 time / NTM T=4 time",
    "NTM T=1 Frechet / NTM T=4 Frechet",
    "NTM T=4 accuracy - NTM T=1 accuracy",
]


@pytest.fixture(scope="module")
def t2i():
    spec = importlib.util.spec_from_file_location("t2i_bench", ROOT / "benchmarks" / "t2i.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclass resolves annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick(t2i, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "quick.json"
    t2i.main(["--quick", "--out", str(out)])
    return out


def test_quick_run_writes_every_row_and_target(t2i, quick):
    result = json.loads(quick.read_text())  # well-formed JSON, no NaN
    assert result["benchmark"] == "t2i" and "torch" in result["fingerprint"]
    found = [(r["method"], r["steps"]) for r in result["records"]]
    expected = [("data", None)] + [(m, s) for m, s in t2i.rows()]
    assert found == expected
    assert {("ntm", t) for t in (1, 2, 4, 8)} <= set(found)
    assert {("flow_matching", t) for t in (4, 8, 16, 50, 100)} <= set(found)
    assert ("tarflow", 1) in found
    for record in result["records"]:
        for key in ("accuracy", "accuracy_heldout", "accuracy_chance", "rule_ok", "exact"):
            assert 0 <= record[key] <= 1, key
        for key in ("frechet", "frechet_heldout", "frechet_fixed"):
            assert math.isfinite(record[key]) and record[key] >= 0, key
        for split in ("test", "heldout"):  # the full reports of trajflow_t2i.evaluate
            assert {"verifier", "verifier_chance", "rule_check", "frechet_distance"} <= set(
                record[split]
            )
        if record["method"] == "data":
            assert record["rule_ok"] == 1.0  # the rule check is exact on ground-truth renders
            # Its distances are those of another real sample (the floor), not of itself (0).
            assert record["frechet"] > 0 and record["frechet_fixed"] > 0
            continue
        assert record["ms_per_image"] > 0 and 0 <= record["accuracy_unguided"] <= 1
        has_likelihood = record["method"] in ("ntm", "tarflow")
        assert (record["bits_per_dim"] is not None) == has_likelihood
        if has_likelihood:
            assert math.isfinite(record["bits_per_dim"])
            assert "t0 = 0.001" in record["likelihood"]["variable"]
    assert [t["name"] for t in result["targets"]] == TARGET_NAMES
    for target in result["targets"]:
        assert set(target) == {"name", "value", "limit", "at_most", "passed"}
    settings = result["settings"]
    assert "t0 = 0.001" in settings["bits_per_dim_variable"]
    assert "K = 256" in settings["bits_per_dim_variable"]
    assert settings["guidance"] == t2i.GUIDANCE and settings["steps_weighting"] == "transitions"
    assert set(result["verifier"]) >= {"test", "heldout"}  # its own accuracy on renders
    assert set(result["train_seconds"]) == {"ntm_pretrain", "ntm_finetune", "flow_matching",
                                            "tarflow"}  # fmt: skip
    assert quick.with_suffix(".png").stat().st_size > 0


def test_every_method_gets_the_same_budget(t2i, monkeypatch):
    """NTM pretraining + finetuning steps equal the FM and TarFlow steps; same batch, same init."""
    calls = []

    def fake_fit(model, config, stage, progress, data_fn=None):
        calls.append((model, stage))
        return model.eval(), 0.0

    monkeypatch.setattr(t2i, "fit", fake_fit)
    settings = t2i.dataclasses.replace(t2i.QUICK, iterations=1001)
    models, _ = t2i.train_all(settings, seed=0, progress=False)
    (pretrain, pre), (ntm, fine), (fm, full), (tarflow, tf) = calls
    assert pre.iterations + fine.iterations == full.iterations == tf.iterations == 1001
    assert pre.batch_size == fine.batch_size == full.batch_size == tf.batch_size
    assert pre.iterations == round(settings.pretrain_fraction * 1001)
    assert isinstance(ntm, TextToImage) and ntm.stage == "ntm" and models["ntm"] is ntm
    assert ntm.generator.teacher is not None and ntm.generator.aux_weight == 2.5
    assert ntm.generator.mode == "pairwise"
    assert ntm.generator.schedule.steps == [1, 2, 4, 8]
    assert ntm.generator.schedule.steps_weighting == "transitions"
    assert isinstance(tarflow, t2i.TextTarFlow) and models["flow_matching"] is fm
    # The two flow-matching runs start from the same weights.
    for a, b in zip(pretrain.parameters(), fm.parameters(), strict=True):
        assert torch.allclose(a, b)


def test_tarflow_matches_the_ntm_parameter_count(t2i):
    config = t2i.t2i_config(t2i.FULL)
    assert config.model.tokens(config.data) == 16 and config.model.patch == 4
    ntm = TextToImage(config, stage="ntm")
    tarflow = t2i.TextTarFlow(config, *t2i.FULL.tarflow)
    ratio = t2i.generator_parameters(tarflow) / t2i.generator_parameters(ntm)
    assert 0.95 <= ratio <= 1.05
    assert t2i.parameter_count(tarflow.text_encoder) == t2i.parameter_count(ntm.text_encoder)
    assert len(tarflow.flow.transform) > len(ntm.generator.transporter)  # deeper


def _perturbed_block(t2i, flip: bool):
    block = t2i.TarFlowBlock(6, 5, dim=16, layers=2, heads=2, flip=flip, cond_features=8)
    with torch.no_grad():
        block.head.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
        block.head.bias.normal_(std=0.3, generator=torch.Generator().manual_seed(2))
    return block.double().eval()


def _contexts(batch: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(batch, 3, 8, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False]] * batch)
    return Context(tokens=tokens, mask=mask), Context(tokens=tokens, mask=torch.zeros_like(mask))


@pytest.mark.parametrize("flip", [False, True])
def test_guided_inverse_without_guidance_is_the_conditional_inverse(t2i, flip):
    block = _perturbed_block(t2i, flip)
    conditional, null = _contexts(4)
    z = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected, _ = block.inverse_kv_cache(z, conditional)
    assert torch.allclose(t2i.guided_inverse(block, z, conditional, null, 0.0), expected, atol=1e-9)


@pytest.mark.parametrize("flip", [False, True])
def test_guided_inverse_inverts_the_guided_forward(t2i, flip):
    """x = guided_inverse(z) satisfies z = (x - b) exp(-a) with b, a mixed from both branches."""
    block, weight = _perturbed_block(t2i, flip), 2.0
    conditional, null = _contexts(4)
    z = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = t2i.guided_inverse(block, z, conditional, null, weight)
    assert not torch.allclose(x, block.inverse_kv_cache(z, conditional)[0], atol=1e-3)
    recorded = []
    original = block._affine
    block._affine = lambda h: recorded.append(original(h)) or recorded[-1]
    with torch.no_grad():
        block(x, conditional), block(x, null)
    (shift_c, scale_c), (shift_u, scale_u) = recorded
    shift = (1 + weight) * shift_c - weight * shift_u
    log_scale = (1 + weight) * scale_c - weight * scale_u
    xs = block._oriented(x)
    z_again = block._oriented((xs - shift) * torch.exp(-log_scale))
    assert torch.allclose(z_again, z, atol=1e-9)


def test_image_features_see_colours_and_blur(t2i):
    images = make_split("shapes", "test", n=16, seed=0).images
    features = t2i.image_features(images)
    assert features.shape == (16, 63)
    shares, off = features[:, 48:56], features[:, 56]
    assert torch.allclose(shares.sum(1), torch.ones(16)) and (off == 0).all()  # exact renders
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().to(torch.uint8)
    assert (t2i.image_features(blurred)[:, 56] > 0).all()  # blur leaves the palette
    assert (features[:, 57:] > 0).all()  # every palette colour has edges in every channel
    flat = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
    assert (t2i.image_features(flat)[:, 57:] == 0).all() and t2i.image_features(flat)[0, 56] == 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        t2i.image_features(images[:, :1])


def test_out_must_be_json(t2i, tmp_path):
    with pytest.raises(SystemExit) as error:
        t2i.main(["--quick", "--out", str(tmp_path / "result.txt")])
    assert error.value.code == 2
    assert not list(tmp_path.iterdir())


def test_tarflow_loss_drops_prompts_and_scores_x_t0(t2i, monkeypatch):
    config = t2i.t2i_config(t2i.QUICK)
    model = t2i.TextTarFlow(config, blocks=1, layers=1, dim=16)
    model.cfg_dropout = 0.5
    data = make_split("shapes", "train", n=64, seed=0)
    ids, mask = model.text_encoder.tokenize(data.captions)
    seen = []
    original = model.flow.log_prob
    monkeypatch.setattr(
        model.flow, "log_prob", lambda x, ctx: seen.append((x, ctx)) or original(x, ctx)
    )
    loss = model.loss(data.images, ids, mask, generator=torch.Generator().manual_seed(0))
    x, ctx = seen[0]
    dropped = ~ctx.mask.any(1)
    assert 10 < int(dropped.sum()) < 54  # about half the prompts, each dropped whole
    assert torch.equal(ctx.mask[~dropped], mask[~dropped])
    assert x.shape == (64, 16, 48) and x.abs().max() <= 1.01  # tokens of x_t0 in [-1, 1]
    assert torch.isfinite(loss.loss) and loss.nll.shape == (64,)
