"""Two-stage text-to-image training: batches, export, exact resume, learned autoencoders."""

from __future__ import annotations

import shutil

import pytest
import torch
from pydantic import ValidationError

from trajflow.registry import Spec
from trajflow_t2i.model import TextToImage
from trajflow_t2i.presets import StageConfig, T2IConfig, preset
from trajflow_t2i.training import caption_batches, train_t2i
from trajflow_t2i.weights import load_model


def tiny(steps: int = 6) -> T2IConfig:
    config = preset("tiny")
    config.train.fm.iterations = config.train.ntm.iterations = steps
    config.train.checkpoint_every = steps // 2
    return config


def test_caption_batches_are_seeded_per_step():
    config = tiny()
    data_fn = caption_batches(config, TextToImage(config, stage="fm"))
    images, ids, mask = data_fn(3, 8)
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 16, 16)
    assert ids.shape == mask.shape and ids.shape[0] == 8 and mask[:, 0].all()
    again = data_fn(3, 8)
    assert all(torch.equal(a, b) for a, b in zip((images, ids, mask), again, strict=True))
    assert not torch.equal(images, data_fn(4, 8)[0])


def test_train_exports_the_ntm_and_resumes_exactly(tmp_path):
    config = tiny()
    whole = tmp_path / "whole"
    model = train_t2i(config, whole, progress=False)
    assert model.stage == "ntm" and (whole / "final" / "model.safetensors").is_file()
    exported = load_model(whole / "final")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

    # Interrupted in the middle of the FM stage: only its first checkpoint survived.
    cut = tmp_path / "cut"
    shutil.copytree(whole / "fm" / "step_00000003", cut / "fm" / "step_00000003")
    with pytest.raises(FileExistsError, match="resume=True"):
        train_t2i(config, cut, progress=False)
    resumed = train_t2i(config, cut, resume=True, progress=False)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name  # same machine, same calls: bitwise


def test_a_learned_autoencoder_is_pretrained_then_frozen(tmp_path):
    config = tiny(4)
    config.model.autoencoder = Spec(name="conv", kwargs={"downsample": 2, "latent_channels": 4})
    config.model.patch = 2
    config.train.autoencoder.iterations = 4
    config = T2IConfig.model_validate(config.model_dump())
    model = train_t2i(config, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "autoencoder").is_dir()
    ae_checkpoint = load_model(tmp_path / "run" / "final").autoencoder.state_dict()
    pretrained = tmp_path / "run" / "autoencoder"
    from trajflow.checkpoint import latest_checkpoint, load_checkpoint
    from trajflow_t2i.training import _Reconstruction

    wrapper = _Reconstruction(TextToImage(config, stage="fm"))
    load_checkpoint(latest_checkpoint(pretrained), model=wrapper)
    # The FM and NTM stages left the autoencoder exactly as its own stage made it.
    for name, value in wrapper.autoencoder.state_dict().items():
        assert torch.equal(value, ae_checkpoint[name]), name
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


def test_a_stage_splits_its_batch_into_micro_batches(tmp_path, monkeypatch):
    """``micro_batches`` reaches trajflow's loop: every loss call sees a share of the batch."""
    config = tiny(2)
    config.train.fm = StageConfig(iterations=2, batch_size=16, warmup_steps=1, micro_batches=4)
    config.train.ntm = StageConfig(iterations=2, batch_size=16, warmup_steps=1, micro_batches=2)
    config = T2IConfig.model_validate(config.model_dump())
    seen, loss = [], TextToImage.loss

    def spy(self, images, *args, **kwargs):
        seen.append((self.stage, images.shape[0]))
        return loss(self, images, *args, **kwargs)

    monkeypatch.setattr(TextToImage, "loss", spy)
    model = train_t2i(config, tmp_path / "run", progress=False)
    assert seen == [("fm", 4)] * 8 + [("ntm", 8)] * 4
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_micro_batches_must_divide_the_stage_batch():
    with pytest.raises(ValidationError, match=r"micro_batches \(3\) must divide batch_size \(16\)"):
        StageConfig(batch_size=16, micro_batches=3)
    assert StageConfig(batch_size=16, micro_batches=4).micro_batches == 4
