"""The text-to-image model: presets, patchify, stages, guidance, likelihood, parameter counts."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from trajflow.registry import Spec
from trajflow_t2i.data import make_split
from trajflow_t2i.model import (
    AUTOENCODERS,
    ConvAutoencoder,
    TextToImage,
    patchify,
    unpatchify,
)
from trajflow_t2i.presets import PRESETS, T2IConfig, preset


@pytest.fixture(scope="module")
def tiny() -> T2IConfig:
    return preset("tiny")


@pytest.fixture(scope="module")
def batch():
    data = make_split("shapes", "train", n=8, seed=0, size=16)
    return data


def test_patchify_round_trip_and_layout():
    latents = torch.randn(2, 3, 8, 8)
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 16, 12)
    # Token 1 is the second patch of the first row: columns 2..3 of rows 0..1.
    assert torch.equal(tokens[0, 1].reshape(3, 2, 2), latents[0, :, 0:2, 2:4])
    assert torch.equal(unpatchify(tokens, 2, 3), latents)


def test_presets_validate_and_round_trip():
    for name in PRESETS:
        config = preset(name)
        assert T2IConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValidationError, match="must divide the latent side"):
        T2IConfig.model_validate({"model": {"patch": 3}})
    with pytest.raises(ValidationError, match="heads"):
        T2IConfig.model_validate({"model": {"heads": 3, "predictor_dim": 64}})


def test_paper_preset_builds_on_meta_with_its_size():
    config = preset("paper")
    with torch.device("meta"):
        model = TextToImage(config, stage="ntm")
    counts = model.parameter_count()
    # Blocks [4, 4, 24] at width 3072: about 12·3072² parameters per layer, 32 layers.
    per_layer = 12 * 3072**2
    assert 30 * per_layer < counts["transporter"] + counts["predictor"] < 34 * per_layer
    assert model.transporter_reads_time()


def test_transporter_is_time_conditioned_and_starts_as_identity(tiny):
    model = TextToImage(tiny, stage="ntm")
    assert model.transporter_reads_time()
    x = torch.randn(4, 16, 48)
    u, logdet = model.generator.transport(x[:, None], torch.rand(4, 1), 4)
    assert torch.equal(u[:, 0], x) and logdet.abs().max() == 0


def test_loss_runs_in_both_stages_and_rejects_float_images(tiny, batch):
    fm = TextToImage(tiny, stage="fm")
    ids, mask = fm.text_encoder.tokenize(batch.captions)
    generator = torch.Generator().manual_seed(0)
    loss = fm.loss(batch.images, ids, mask, generator=generator).loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    ntm = TextToImage.finetune(fm)
    out = ntm.loss(batch.images, ids, mask, generator=generator)
    assert torch.isfinite(out.loss) and out.aux is not None
    with pytest.raises(TypeError, match="integer pixel levels"):
        ntm.loss(batch.images.float(), ids, mask)


def test_finetuned_model_starts_as_the_fm_ancestral_sampler(tiny):
    torch.manual_seed(0)
    fm = TextToImage(tiny, stage="fm").double()
    with torch.no_grad():  # move off the initialisation so the test is not trivial, but
        # leave the (t_out, T) and δ heads, which FM training never reaches, at zero
        for name, parameter in fm.generator.net.named_parameters():
            if not name.startswith(("delta_head", "target_time")):
                parameter.add_(0.05 * torch.randn_like(parameter))
    ntm = TextToImage.finetune(fm)
    tokens, mask, _ = fm.encode_text(["a red circle", "two blue squares"])
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ancestral = fm.generator.sample(
        2, steps=4, method="ancestral", y=tokens, y_mask=mask, generator=seed()
    )
    sampled = ntm.generator.sample(2, steps=4, y=tokens, y_mask=mask, generator=seed())
    torch.testing.assert_close(sampled, ancestral, rtol=1e-9, atol=1e-9)


def test_generate_is_seeded_and_guidance_changes_samples(tiny):
    model = TextToImage(tiny, stage="ntm")
    with torch.no_grad():
        for parameter in model.generator.predictor.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    prompts = ["a red circle", "three green squares"]
    first = model.generate(prompts, steps=2, cfg=2.0, generator=torch.Generator().manual_seed(1))
    again = model.generate(prompts, steps=2, cfg=2.0, generator=torch.Generator().manual_seed(1))
    plain = model.generate(prompts, steps=2, cfg=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)  # same call, same seed, same machine
    assert (first - plain).abs().max() > 1e-4
    assert first.shape == (2, 3, 16, 16) and first.abs().max() <= 1


def test_fm_stage_guidance_mixes_velocities(tiny):
    model = TextToImage(tiny, stage="fm")
    with torch.no_grad():
        for parameter in model.generator.net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    guided = model.generate(["a red circle"], steps=3, cfg=1.5, generator=seed())
    plain = model.generate(["a red circle"], steps=3, generator=seed())
    assert (guided - plain).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "at least one prompt"),
        ({"prompts": ["a red circle"], "cfg": -1.0}, "cfg must be a finite weight >= 0"),
        ({"prompts": ["a red circle"], "cfg": float("nan")}, "cfg must be a finite weight"),
        ({"prompts": ["a red circle"], "steps": 0}, "steps must be a positive integer"),
        ({"prompts": ["a red zebra"]}, "zebra"),
        ({"prompts": ["   "]}, "empty"),
    ],
)
def test_generate_rejects_bad_input(tiny, kwargs, message):
    model = TextToImage(tiny, stage="ntm")
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


def test_bits_per_dim_states_its_variable(tiny, batch):
    model = TextToImage(tiny, stage="ntm")
    bound = model.bits_per_dim(
        batch.images[:4], batch.captions[:4], steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert bound.bits_per_dim.shape == (4,) and torch.isfinite(bound.bits_per_dim).all()
    assert "K = 256" in bound.variable and "T = 4" in bound.variable
    with pytest.raises(ValueError, match="NTM stage"):
        TextToImage(tiny, stage="fm").bits_per_dim(batch.images[:2], batch.captions[:2])


def test_conv_autoencoder_shapes_and_registry():
    assert {"identity", "conv"} <= set(AUTOENCODERS.names())
    autoencoder = ConvAutoencoder(channels=3, latent_channels=4, downsample=4)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = autoencoder.encode(images)
    assert latents.shape == (2, 4, 4, 4)
    assert autoencoder.decode(latents).shape == images.shape
    loss = autoencoder.reconstruction_loss(images)
    loss.backward()
    assert all(p.grad is not None for p in autoencoder.parameters())
    with pytest.raises(ValueError, match="power-of-two downsample"):
        ConvAutoencoder(downsample=3)


def test_model_with_learned_autoencoder_trains_on_latents():
    config = preset("tiny").model_copy(deep=True)
    config.model.autoencoder = Spec(name="conv", kwargs={"downsample": 2, "latent_channels": 4})
    config.model.patch = 2
    config = T2IConfig.model_validate(config.model_dump())
    model = TextToImage(config, stage="fm")
    data = make_split("shapes", "train", n=4, seed=0, size=16)
    ids, mask = model.text_encoder.tokenize(data.captions)
    loss = model.loss(data.images, ids, mask, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.generate(["a red circle"], steps=2).shape == (1, 3, 16, 16)
