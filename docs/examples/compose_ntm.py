"""Compose your own NTM: transporter, schedule and predictor; train, sample, evaluate, reload.

Run from the repository root: ``python docs/examples/compose_ntm.py`` (a few seconds on a
laptop CPU). The docs page ``docs/tutorials/compose_ntm.md`` includes this file section by
section, and ``tests/test_docs.py`` checks the module-level results it leaves behind
(``SW_BEFORE``, ``SW_AFTER``, ``SAME_AFTER_RELOAD``, ...).
"""

from __future__ import annotations

# --8<-- [start:imports]
import tempfile
from pathlib import Path

import torch

from trajflow import NTM, PREDICTORS, FlowMatching, ScheduleConfig, Sequential, sample_dataset
from trajflow.checkpoint import load_checkpoint, save_checkpoint
from trajflow.config import ModelConfig
from trajflow.metrics import sliced_wasserstein
from trajflow.schedules import sample_trajectory
from trajflow.train import TrainConfig, train

# --8<-- [end:imports]

# --8<-- [start:transporter]
# Two spline couplings that read the level's time (time_features) and an LU linear between
# them, which mixes the two coordinates and is the same at every level.
coupling = {"features": 2, "hidden_features": [32, 32], "time_features": 16, "bound": 4.0}
TRANSPORTER = [
    {"name": "spline_coupling", "kwargs": {**coupling, "parity": False}},
    {"name": "lu_linear", "kwargs": {"features": 2}},
    {"name": "spline_coupling", "kwargs": {**coupling, "parity": True}},
]
# --8<-- [end:transporter]

# --8<-- [start:schedule]
# One model for T = 2 and T = 4 coarse steps, on a grid shifted towards high noise.
SCHEDULE = ScheduleConfig(grid="shifted", shift=0.5, steps=[2, 4])
PREDICTOR = {"name": "mlp", "kwargs": {"features": 2, "hidden_features": [64, 64]}}
# --8<-- [end:schedule]

# --8<-- [start:build]
torch.manual_seed(0)
predictor = PREDICTORS.build(PREDICTOR)
transporter = Sequential.from_specs(TRANSPORTER)
model = NTM(transporter, predictor, SCHEDULE, mode="end_to_end")
print(f"{sum(p.numel() for p in model.parameters())} parameters")
# --8<-- [end:build]

# --8<-- [start:config]
MODEL_CONFIG = ModelConfig(
    kind="ntm", predictor=PREDICTOR, transporter=TRANSPORTER, schedule=SCHEDULE, mode="end_to_end"
)
text = MODEL_CONFIG.model_dump_json(indent=2)  # what a checkpoint's config.json holds
torch.manual_seed(0)  # same seed, same build order (predictor, then transporter)
from_json = ModelConfig.model_validate_json(text).build()
SAME_AS_CONFIG = all(
    torch.equal(a, b)
    for a, b in zip(model.state_dict().values(), from_json.state_dict().values(), strict=True)
)
print(f"built from JSON: identical parameters = {SAME_AS_CONFIG}")
# --8<-- [end:config]

# --8<-- [start:train]
TEST = sample_dataset("two_moons", 2000, seed=1_000)  # held-out points


def sample_quality(sampler: torch.nn.Module, **kwargs) -> float:
    """Sliced Wasserstein distance of 2000 samples to the held-out points (lower is better)."""
    samples = sampler.sample(2000, generator=torch.Generator().manual_seed(1), **kwargs)
    return sliced_wasserstein(samples, TEST, generator=torch.Generator().manual_seed(0))


SW_BEFORE = sample_quality(model, steps=4)
BITS_BEFORE = model.data_bound(TEST, steps=4).bits_per_dim.mean().item()

config = TrainConfig(
    iterations=200, batch_size=256, lr=3e-3, warmup_steps=20, dataset="two_moons", seed=0
)
result = train(model, config, model_config=MODEL_CONFIG, progress=False)
print(f"{result.step} steps in {result.wall_time:.1f} s, final loss {result.final_loss:.3f}")
# --8<-- [end:train]

# --8<-- [start:sample]
model.eval()
samples = model.sample(2000, steps=4, generator=torch.Generator().manual_seed(1))
SW_AFTER = sample_quality(model, steps=4)
SW_AFTER_T2 = sample_quality(model, steps=2)  # the same model with 2 steps
print(f"sliced Wasserstein, 4 steps: {SW_BEFORE:.3f} before, {SW_AFTER:.3f} after training")
print(f"sliced Wasserstein, 2 steps: {SW_AFTER_T2:.3f}")
# --8<-- [end:sample]

# --8<-- [start:likelihood]
bound = model.data_bound(TEST, steps=4, generator=torch.Generator().manual_seed(2))
BITS_AFTER = bound.bits_per_dim.mean().item()
print(f"data bound: {BITS_AFTER:.2f} bits/dim (untrained: {BITS_BEFORE:.3g}) on {bound.variable}")

# The exact log-density of one forward trajectory per test point, on the evaluation grid.
t0 = torch.full((len(TEST),), SCHEDULE.t_min_eval, dtype=torch.float64)
times = model.grid(4, t0)  # (B, T + 1): t_0 = 1e-3 < t_1 < ... < t_4 = 1
trajectory = sample_trajectory(TEST, times, generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    log_p = model.trajectory_log_prob(trajectory, times)  # (B,), nats, exact
print(f"trajectory log-density: {log_p.mean().item():.2f} nats over {tuple(trajectory.shape)}")
# --8<-- [end:likelihood]

# --8<-- [start:checkpoint]
with tempfile.TemporaryDirectory() as folder:
    path = save_checkpoint(Path(folder) / "ntm", model, MODEL_CONFIG, step=result.step)
    print(sorted(p.name for p in path.iterdir()))  # ['config.json', 'weights.safetensors']
    reloaded, state = load_checkpoint(path)  # rebuilt from config.json, no pickle
same_seed = {"n": 500, "steps": 4}
SAME_AFTER_RELOAD = torch.equal(
    model.sample(**same_seed, generator=torch.Generator().manual_seed(7)),
    reloaded.sample(**same_seed, generator=torch.Generator().manual_seed(7)),
)
print(f"step {state.step} reloaded; same samples for the same seed: {SAME_AFTER_RELOAD}")
# --8<-- [end:checkpoint]

# --8<-- [start:flow_matching]
velocity = PREDICTORS.build("mlp", features=2, hidden_features=[64, 64], target="velocity")
fm = train(FlowMatching(velocity, SCHEDULE), config, progress=False).model.eval()
SW_FM = {steps: sample_quality(fm, steps=steps) for steps in (4, 100)}
print(f"flow matching, Euler: 4 steps {SW_FM[4]:.3f}, 100 steps {SW_FM[100]:.3f}")

# An NTM initialised from the FM model starts as FM's Gaussian ancestral sampler: the same
# seed gives the same samples, up to float32 rounding (the two compute μ_post differently).
finetune = NTM.from_flow_matching(fm)
x_ntm = finetune.sample(500, steps=4, generator=torch.Generator().manual_seed(7))
x_fm = fm.sample(500, steps=4, method="ancestral", generator=torch.Generator().manual_seed(7))
FINETUNE_GAP = (x_ntm - x_fm).abs().max().item()
print(f"NTM from FM vs FM ancestral sampler, same seed: max |difference| {FINETUNE_GAP:.1e}")
# --8<-- [end:flow_matching]
