"""Denoise NTM samples: trajectory score denoising and a learned one-pass denoiser.

Run from the repository root: ``python docs/examples/denoising.py`` (about ten seconds on a
laptop CPU). ``docs/denoising.md`` includes this file section by section; ``tests/test_docs.py``
runs it.
"""

from __future__ import annotations

# --8<-- [start:model]
import tempfile
import time
from pathlib import Path

import torch

from trajflow import sample_dataset
from trajflow.config import toy_ntm_config
from trajflow.denoise import (
    LearnedDenoiser,
    denoiser_loss,
    denoiser_targets,
    load_denoiser,
    sample_denoised,
    sample_with_denoiser,
    save_denoiser,
)
from trajflow.train import TrainConfig, train

torch.manual_seed(0)
config = toy_ntm_config(predictor_hidden=(64, 64), transporter_layers=2, steps=(4,))
model = config.build()
train_config = TrainConfig(
    iterations=200, batch_size=256, lr=3e-3, warmup_steps=20, dataset="two_moons", seed=0
)
model = train(model, train_config, model_config=config, progress=False).model.eval()
model.requires_grad_(False)  # frozen from here on: only the denoiser learns
# --8<-- [end:model]

# --8<-- [start:score]
TEST = sample_dataset("two_moons", 2000, seed=1_000)


def off_manifold(points: torch.Tensor) -> float:
    """Mean distance of each point to its nearest held-out data point (lower: sharper)."""
    return torch.cdist(points, TEST).min(dim=1).values.mean().item()


# Stop the chain at a fairly noisy t_0 = 0.05 so that the denoising step has work to do.
seed, n = torch.Generator().manual_seed(1), 1000
raw = model.sample(n, steps=4, t_min=0.05, generator=seed)
seed.manual_seed(1)  # the same chain, then trajectory Tweedie at t_0
denoised = sample_denoised(model, n, steps=4, t_min=0.05, generator=seed)
print(f"off-manifold distance: raw x_t0 {off_manifold(raw):.4f}, score-denoised "
      f"{off_manifold(denoised):.4f}")  # fmt: skip
# --8<-- [end:score]

# --8<-- [start:learned]
torch.manual_seed(0)
denoiser = LearnedDenoiser(features=2, dim=32, layers=2, heads=4)
optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(2)
DENOISER_STEPS = 150
for _ in range(DENOISER_STEPS):
    x0 = sample_dataset("two_moons", 256)  # real data
    # Forward trajectories of x0 at the denoiser's t_0, u_{t_0} and the frozen NTM's x̂_0.
    u_t0, target = denoiser_targets(model, x0, steps=4, t0=0.05, generator=generator)
    loss = denoiser_loss(denoiser, u_t0, target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"denoiser MSE to the score-denoised targets after {DENOISER_STEPS} steps: {loss.item():.2e}")
# --8<-- [end:learned]

# --8<-- [start:compare]
denoiser.eval()
seed.manual_seed(1)
start = time.perf_counter()
learned = sample_with_denoiser(model, denoiser, n, steps=4, t_min=0.05, generator=seed)
learned_time = time.perf_counter() - start
seed.manual_seed(1)
start = time.perf_counter()
denoised = sample_denoised(model, n, steps=4, t_min=0.05, generator=seed)
score_time = time.perf_counter() - start
GAP = (learned - denoised).norm(dim=1).mean().item()  # same chain, the two denoisers
print(f"learned: off-manifold {off_manifold(learned):.4f}, mean distance to the score path "
      f"{GAP:.4f}, {score_time / learned_time:.1f}x faster")  # fmt: skip

with tempfile.TemporaryDirectory() as folder:
    path = save_denoiser(Path(folder) / "denoiser", denoiser, step=DENOISER_STEPS)
    reloaded = load_denoiser(path)  # rebuilt from config.json, no pickle
    assert torch.allclose(reloaded(learned), denoiser(learned))
# --8<-- [end:compare]
