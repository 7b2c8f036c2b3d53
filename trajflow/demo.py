"""Demos on embedded toy 2-D data: the NTM main job, and a plain spline flow.

:func:`ntm_demo` (``make demo``) trains a small NTM and flow matching on the same budget,
samples the NTM with 4 steps and FM with 4 and 100 Euler steps, and reports likelihoods and
sample quality. :func:`flow_demo` trains a neural spline flow built from registered blocks.

Example:
    >>> report = flow_demo(iterations=5, out_dir=None, progress=False)
    >>> sorted(report)
    ['dataset', 'iterations', 'seconds', 'test_bits_per_dim', 'test_log_likelihood']
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from trajflow.core import Sequential
from trajflow.data import sample_dataset
from trajflow.flow import NormalizingFlow
from trajflow.progress import progress_bar

__all__ = ["build_spline_flow", "flow_demo", "ntm_demo"]


def build_spline_flow(
    features: int = 2, layers: int = 6, hidden: int = 64, bins: int = 8
) -> Sequential:
    """A neural spline flow from specs: ActNorm, then spline couplings of alternating parity."""
    specs: list[dict] = [{"name": "actnorm", "kwargs": {"features": features}}]
    for layer in range(layers):
        specs.append(
            {
                "name": "spline_coupling",
                "kwargs": {
                    "features": features,
                    "hidden_features": [hidden, hidden],
                    "bins": bins,
                    "bound": 4.0,
                    "parity": layer % 2 == 1,
                },
            }
        )
    return Sequential.from_specs(specs)


def flow_demo(
    dataset: str = "checkerboard",
    iterations: int = 800,
    batch_size: int = 512,
    seed: int = 0,
    out_dir: str | Path | None = "out/demo",
    progress: bool = True,
) -> dict:
    """Trains a spline flow on ``dataset``; reports held-out log-likelihood; plots samples.

    ``progress`` shows a bar on a terminal, or a line every 10% of the steps in a log.

    Returns:
        ``test_log_likelihood`` (nats per sample, 5000 held-out points), its bits/dim,
        the wall time and the settings.
    """
    torch.manual_seed(seed)
    flow = NormalizingFlow(build_spline_flow(), shape=(2,))
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(iterations, 1))
    flow.log_prob(sample_dataset(dataset, 4096, seed=seed))  # ActNorm's data-dependent init
    start = time.perf_counter()
    with progress_bar(iterations, desc="train spline flow", enabled=progress) as bar:
        for step in range(iterations):
            batch = sample_dataset(dataset, batch_size, seed=seed * 1_000_003 + step + 1)
            loss = -flow.log_prob(batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            if (step + 1) % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        test = sample_dataset(dataset, 5000, seed=10_000 + seed)
        log_likelihood = flow.log_prob(test).mean().item()
        samples = flow.sample(5000, generator=torch.Generator().manual_seed(seed))
    report = {
        "dataset": dataset,
        "iterations": iterations,
        "seconds": round(seconds, 2),
        "test_log_likelihood": log_likelihood,
        "test_bits_per_dim": -log_likelihood / (2 * math.log(2)),
    }
    if out_dir is not None:
        from trajflow.plotting import scatter_grid

        out = Path(out_dir)
        scatter_grid(
            {
                f"{dataset} (data)": test,
                f"spline flow samples (test LL {log_likelihood:.3f})": samples,
            },
            out / "flow_samples.png",
            columns=2,
            limit=3.0,
        )
        (out / "flow_report.json").write_text(json.dumps(report, indent=2))
    return report


def ntm_demo(
    dataset: str = "checkerboard",
    iterations: int = 2000,
    batch_size: int = 1024,
    lr: float = 2e-3,
    seed: int = 0,
    out_dir: str | Path | None = "out/demo",
    progress: bool = True,
) -> dict:
    """Trains an NTM and a flow-matching model on ``dataset`` and compares few-step samples.

    Both use the same MLP (as predictor / velocity net) and the same budget. The NTM is one
    model trained with ``T`` drawn from {2, 4, 8}; it is sampled with 4 steps, FM with 4 and
    100 Euler steps. ``progress`` shows a bar on a terminal, or a line every 10% of each
    training in a log (see :func:`~trajflow.progress.progress_bar`).

    Returns:
        The report: the NTM's trajectory NLL and its data bits/dim bound (with the variable it
        is about), sliced Wasserstein distances to held-out data, and wall times.
    """
    from trajflow.config import toy_flow_matching_config, toy_ntm_config
    from trajflow.metrics import sliced_wasserstein
    from trajflow.train import TrainConfig, train

    config = TrainConfig(iterations=iterations, batch_size=batch_size, dataset=dataset, lr=lr,
                         seed=seed, warmup_steps=min(100, iterations // 10))  # fmt: skip
    start = time.perf_counter()
    ntm = train(toy_ntm_config().build(), config, progress=progress).model.eval()
    ntm_seconds = time.perf_counter() - start
    fm = train(toy_flow_matching_config().build(), config, progress=progress).model.eval()
    fm_seconds = time.perf_counter() - start - ntm_seconds

    test = sample_dataset(dataset, 5000, seed=10_000 + seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nll = ntm.loss(test, mode="end_to_end", generator=generator)
        bound = ntm.data_bound(test, steps=4, generator=generator)
        samples = {
            "NTM, 4 steps": ntm.sample(5000, steps=4, generator=generator),
            "FM Euler, 4 steps": fm.sample(5000, steps=4, generator=generator),
            "FM Euler, 100 steps": fm.sample(5000, steps=100, generator=generator),
        }
    report = {
        "dataset": dataset,
        "iterations": iterations,
        "batch_size": batch_size,
        "ntm_train_seconds": round(ntm_seconds, 1),
        "fm_train_seconds": round(fm_seconds, 1),
        "ntm_trajectory_nll_nats": nll.nll.mean().item(),
        "ntm_trajectory_steps": nll.steps,
        "ntm_data_bits_per_dim_bound": bound.bits_per_dim.mean().item(),
        "bound_variable": bound.variable,
        "sliced_wasserstein": {
            name: sliced_wasserstein(points, test) for name, points in samples.items()
        },
    }
    if out_dir is not None:
        from trajflow.plotting import scatter_grid

        out = Path(out_dir)
        panels = {f"{dataset} (held-out data)": test}
        panels.update({
            f"{name} (SW {report['sliced_wasserstein'][name]:.3f})": points
            for name, points in samples.items()
        })  # fmt: skip
        scatter_grid(panels, out / "ntm_vs_fm.png", columns=4, limit=3.0)
        (out / "ntm_report.json").write_text(json.dumps(report, indent=2))
    return report
