"""The text-to-image learned denoiser: targets, training, checkpoints, sampling paths, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from trajflow.checkpoint import CheckpointError
from trajflow.denoise import (
    LearnedDenoiser,
    load_denoiser,
    sample_u_trajectory,
    trajectory_score_denoise,
    trajectory_tweedie,
)
from trajflow.schedules import sample_trajectory
from trajflow_t2i.cli import main
from trajflow_t2i.denoiser import (
    DENOISER_DIR,
    DenoiserTrainConfig,
    build_denoiser,
    denoiser_pairs,
    load_t2i_denoiser,
    model_fingerprint,
    save_t2i_denoiser,
    train_denoiser,
    training_rows,
)
from trajflow_t2i.model import TextToImage
from trajflow_t2i.pipeline import Pipeline
from trajflow_t2i.presets import preset
from trajflow_t2i.weights import export_model

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a red square"]


@pytest.fixture(scope="module")
def model() -> TextToImage:
    """A tiny NTM whose transporter is not the identity (so the inverse matters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TextToImage(preset("tiny"), stage="ntm")
        with torch.no_grad():
            for parameter in model.generator.transporter.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def trained(model):
    config = DenoiserTrainConfig(steps=60, pairs=256, holdout=64, batch_size=32, lr=3e-3)
    return train_denoiser(model, config, progress=False), config


def _chain(model, prompts, seed, steps=3, cfg=1.5):
    tokens, mask, _ = model.encode_text(prompts)
    generator = torch.Generator().manual_seed(seed)
    u, times = sample_u_trajectory(model.generator, len(prompts), steps, cfg, tokens, mask,
                                   generator=generator)  # fmt: skip
    return u, times, tokens, mask


def test_all_three_paths_denoise_the_same_chain(model, trained):
    denoiser = trained[0].denoiser
    u, times, tokens, mask = _chain(model, PROMPTS, seed=3)

    def images(kind: str, **kwargs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return model.generate(PROMPTS, 3, 1.5, generator, denoiser=kind, **kwargs)

    none = model.to_images(model.generator.untransport(u[:, 0], times[:, 0], 3))
    with torch.no_grad():
        learned = model.to_images(denoiser(u[:, 0], tokens, mask))
    score = model.to_images(trajectory_score_denoise(model.generator, u, times, tokens, mask))
    torch.testing.assert_close(images("none"), none, atol=1e-5, rtol=0)
    torch.testing.assert_close(images("learned", learned_denoiser=denoiser), learned, atol=1e-5,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(images("score"), score, atol=1e-4, rtol=0)
    # The default is today's path, and the three really differ.
    generator = torch.Generator().manual_seed(3)
    torch.testing.assert_close(model.generate(PROMPTS, 3, 1.5, generator), none, atol=1e-5, rtol=0)
    assert (score - none).abs().mean() > 1e-3 and (learned - none).abs().mean() > 1e-3


def test_generate_rejects_bad_denoiser_requests(model):
    with pytest.raises(ValueError, match="'none', 'score' or 'learned'"):
        model.generate(PROMPTS[:1], denoiser="tweedie")
    with pytest.raises(ValueError, match="needs learned_denoiser"):
        model.generate(PROMPTS[:1], denoiser="learned")
    fm = TextToImage(preset("tiny"), stage="fm")
    with pytest.raises(ValueError, match="needs the NTM stage"):
        fm.generate(PROMPTS[:1], denoiser="score")
    wrong_shape = LearnedDenoiser(features=12, tokens=16, dim=16, layers=1, heads=2,
                                  cond_features=model.text_encoder.features)  # fmt: skip
    with pytest.raises(ValueError, match=r"tokens of shape \(16, 12\)"):
        model.generate(PROMPTS[:1], denoiser="learned", learned_denoiser=wrong_shape)
    wrong_width = LearnedDenoiser(features=48, tokens=16, dim=16, layers=1, heads=2,
                                  cond_features=7)  # fmt: skip
    with pytest.raises(ValueError, match="prompt tokens of width 7"):
        model.generate(PROMPTS[:1], denoiser="learned", learned_denoiser=wrong_width)
    with pytest.raises(TypeError, match="learned denoiser module"):
        model.generate(PROMPTS[:1], denoiser="learned", learned_denoiser=lambda u: u)


def test_pairs_are_score_targets_of_real_captioned_images(model):
    pairs = denoiser_pairs(model, 6, batch_size=4, seed=1, sampling_steps=[3])
    assert pairs.u_t0.shape == pairs.target.shape == (6, 16, 48) and len(pairs) == 6
    # Rebuild the first batch by hand: the rows of the training split, their dequantised
    # images, the frozen text encoder's tokens and the trajectory Tweedie target.
    from trajflow.train import step_seed
    from trajflow_t2i.data import dequantize

    images, ids, mask = training_rows(model, 1)(step_seed(1, 0, "t2i/denoiser/train/rows"), 4)
    generator = torch.Generator().manual_seed(step_seed(1, 0, "t2i/denoiser/train"))
    torch.randint(1, (), generator=generator)  # the draw of T
    x0 = model.to_tokens(dequantize(images, generator, model.levels))
    with torch.no_grad():
        tokens, token_mask = model.text_encoder(ids, mask)
    t0 = model.generator.schedule.t_min_eval
    times = model.generator.grid(3, torch.full((4,), t0, dtype=torch.float64))
    trajectory = sample_trajectory(x0, times, generator)
    target = trajectory_tweedie(model.generator, trajectory, times, tokens, token_mask)
    u_t0 = model.generator.transport(trajectory[:, :1], times[:, :1], 3)[0][:, 0]
    torch.testing.assert_close(pairs.y[:4], tokens)
    assert torch.equal(pairs.y_mask[:4], token_mask)
    torch.testing.assert_close(pairs.u_t0[:4], u_t0, atol=1e-5, rtol=0)
    torch.testing.assert_close(pairs.target[:4], target, atol=1e-4, rtol=1e-4)
    # Real data: the clean images sit in [-1, 1] and the targets near them.
    assert (pairs.target[:4] - x0).abs().mean() < 0.5
    other = denoiser_pairs(model, 6, batch_size=4, seed=1, sampling_steps=[3], stream="holdout")
    assert (other.u_t0 - pairs.u_t0).abs().mean() > 0.1


def test_training_fits_the_targets_and_leaves_the_model_alone(model, trained):
    result, _ = trained
    metrics = result.metrics
    # The untrained denoiser is the identity; training must beat it clearly on held-out pairs.
    assert metrics["holdout_mse"] < 0.5 * metrics["holdout_identity_mse"], metrics
    assert not result.denoiser.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    train_denoiser(model, DenoiserTrainConfig(steps=1, pairs=4, holdout=2, batch_size=2),
                   progress=False)  # fmt: skip
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="needs the NTM stage"):
        train_denoiser(TextToImage(preset("tiny"), stage="fm"), progress=False)
    with pytest.raises(TypeError, match="DenoiserTrainConfig"):
        train_denoiser(model, {"steps": 1}, progress=False)


def test_checkpoint_round_trip_and_fingerprint(model, trained, tmp_path):
    (result, config) = trained
    folder = save_t2i_denoiser(tmp_path / "d", result.denoiser, model, config, result.metrics)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["extra"]["model_fingerprint"] == model_fingerprint(model)
    assert saved["train_config"]["steps"] == config.steps
    u, _, tokens, mask = _chain(model, PROMPTS, seed=0)
    with torch.no_grad():
        expected = result.denoiser(u[:, 0], tokens, mask)
        for again in (load_t2i_denoiser(folder, model), load_denoiser(folder)):
            torch.testing.assert_close(again(u[:, 0], tokens, mask), expected)
    other = TextToImage(preset("tiny"), stage="ntm")  # same shapes, other weights
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(ValueError, match="trained against other model weights"):
        load_t2i_denoiser(folder, other)
    assert isinstance(load_t2i_denoiser(folder, other, check_fingerprint=False), LearnedDenoiser)
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError):
        load_t2i_denoiser(folder, model)


def test_pipeline_loads_the_denoiser_of_an_exported_model(model, trained, tmp_path):
    export_model(model, tmp_path / "m")
    plain = Pipeline.from_pretrained(tmp_path / "m")
    assert plain.denoiser is None
    with pytest.raises(ValueError, match="needs a pipeline with a learned denoiser"):
        plain(PROMPTS[:1], denoiser="learned")
    save_t2i_denoiser(tmp_path / "m" / DENOISER_DIR, trained[0].denoiser, model)
    pipe = Pipeline.from_pretrained(tmp_path / "m")
    assert isinstance(pipe.denoiser, LearnedDenoiser)
    images = {kind: pipe(PROMPTS[:2], n=2, steps=3, cfg=1.0, seed=5, denoiser=kind)
              for kind in ("none", "score", "learned")}  # fmt: skip
    assert all(v.shape == (2, 2, 3, 16, 16) and v.dtype == torch.uint8 for v in images.values())
    direct = model.generate([p for p in PROMPTS[:2] for _ in range(2)], 3, 1.0,
                            torch.Generator().manual_seed(5), denoiser="learned",
                            learned_denoiser=trained[0].denoiser)  # fmt: skip
    expected = ((direct.clamp(-1, 1) + 1) * 127.5).round().reshape(2, 2, 3, 16, 16)
    assert (images["learned"].float() - expected).abs().max() <= 1
    assert not torch.equal(images["learned"], images["none"])


def test_cli_train_denoiser_and_sample_with_it(model, tmp_path, capsys):
    folder = export_model(model, tmp_path / "m")
    before = (folder / "model.safetensors").read_bytes()
    out = folder / DENOISER_DIR
    main(["train-denoiser", "--checkpoint", str(folder), "--out", str(out), "--steps", "2",
          "--pairs", "8", "--batch-size", "4", "--holdout", "4"])  # fmt: skip
    assert "holdout_mse" in capsys.readouterr().out
    assert isinstance(load_t2i_denoiser(out, model), LearnedDenoiser)
    for kind in ("none", "score", "learned"):
        png = tmp_path / f"{kind}.png"
        main(["sample", "a red circle", "--checkpoint", str(folder), "--n", "2", "--steps",
              "2", "--denoiser", kind, "--out", str(png)])  # fmt: skip
        assert png.stat().st_size > 0
    # Mistakes exit with status 2 and a message; the model folder is never replaced.
    for argv, message in [
        (["train-denoiser", "--checkpoint", str(folder), "--out", str(folder)], "not a denoiser"),
        (["train-denoiser", "--checkpoint", str(folder), "--out", str(tmp_path / "x"),
          "--steps", "0"], "invalid denoiser settings"),
        (["sample", "a red circle", "--checkpoint", str(folder), "--out", str(tmp_path / "a.png"),
          "--denoiser-checkpoint", str(out)], "needs --denoiser learned"),
        (["sample", "a red circle", "--checkpoint", str(folder), "--out", str(tmp_path / "b.png"),
          "--denoiser", "learned", "--denoiser-checkpoint", str(tmp_path / "none")],
         "no learned denoiser"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_build_denoiser_is_light_and_fits_the_model(model):
    denoiser = build_denoiser(model)
    assert denoiser.event_shape == (16, 48)
    assert denoiser.cond_features == model.text_encoder.features
    parameters = sum(p.numel() for p in denoiser.parameters())
    assert parameters < sum(p.numel() for p in model.generator.predictor.parameters())
