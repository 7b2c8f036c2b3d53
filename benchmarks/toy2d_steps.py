"""Why more steps hurt: where the error of a T-step NTM sample comes from.

Trains the from-scratch NTM and the Gaussian chain of ``benchmarks/toy2d.py`` (same configs,
budget and seed) on one dataset, then takes the few-step samplers apart:

* **error by starting level**: run the model's chain from the *true* forward level ``j``
  (``x_{t_j}`` of held-out data, transported to u-space) down to ``t_0``. ``j = T`` is the
  ordinary sampler, ``j = 1`` only the last step; the difference between successive starts
  is what one step adds. Reported as sliced Wasserstein to held-out data and as the sample
  mean, whose drift from step to step is the error that accumulates;
* **one step from the truth**: one step of the model from the true level ``j`` to ``j - 1``,
  compared with the true ``x_{t_{j-1}}`` of the same trajectories: the mean offset each step
  adds on its own (before any of it compounds), and its sliced Wasserstein;
* **the best Gaussian chain**: each step ``N(A x_t + B m, C² + B² v)`` with ``m`` and ``v``
  the exact posterior mean and variance of ``x_0`` given ``x_t`` (the data taken as a large
  reference sample): what a Gaussian chain with perfect networks reaches at each ``T``;
* **per-level likelihood**: the trajectory NLL of each factor ``k`` (nats/dim, on the
  evaluation grid), NTM against the chain: what the transporter earns at each level;
* **local vs global metrics** at ``T = 2, 4, 8``: sliced Wasserstein and energy distance
  (dominated by global moments) beside KDE cross-entropies (local structure; see
  :func:`trajflow.metrics.kde_cross_entropy`).

Usage:
    python benchmarks/toy2d_steps.py --dataset spirals \
        --out benchmarks/results/toy2d_steps_spirals.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fingerprint, markdown_table, pyplot, write_json
from toy2d import EVAL_POINTS, ITERATIONS, T0, fit, ntm_config

from trajflow import DATASETS, NTM, sample_dataset
from trajflow.metrics import energy_distance, kde_cross_entropy, sliced_wasserstein
from trajflow.schedules import posterior_coefficients, sample_trajectory

#: Step counts taken apart, and those compared on every metric.
DECOMPOSED_STEPS, COMPARED_STEPS = [4, 8], [2, 4, 8]
#: Points of the reference sample that defines the best Gaussian chain's posteriors.
ORACLE_REFERENCE = 30_000
#: Kernel width of the KDE metrics (the toy data sets span about [-3, 3]).
BANDWIDTH = 0.08


def grid(model: NTM, n: int, steps: int) -> Tensor:
    """The evaluation grid ``(n, T + 1)`` with ``t_0 = T0``."""
    return model.grid(steps, torch.full((n,), T0, dtype=torch.float64))


def _true_level(
    model: NTM, x0: Tensor, steps: int, level: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The grid, a forward trajectory of ``x0`` and its level ``level`` in u-space."""
    times = grid(model, x0.shape[0], steps)
    trajectory = sample_trajectory(x0, times, generator)
    if level == steps:
        return times, trajectory, trajectory[:, steps]
    u = model.transport(trajectory[:, level : level + 1], times[:, level : level + 1], steps)
    return times, trajectory, u[0][:, 0]


def _step(
    model: NTM, u: Tensor, times: Tensor, k: int, steps: int, generator: torch.Generator
) -> Tensor:
    """Draws ``u_k`` from the model's Gaussian given ``u_{k+1}``."""
    mean, log_std = model.gaussian(u[:, None], times[:, k + 1 : k + 2], times[:, k : k + 1], steps)
    return mean[:, 0] + torch.exp(log_std[:, 0]) * torch.randn(u.shape, generator=generator)


@torch.no_grad()
def start_from_level(
    model: NTM, x0: Tensor, steps: int, level: int, generator: torch.Generator
) -> Tensor:
    """Samples ``x_{t_0}`` by running ``model``'s chain from the true level ``level``.

    ``level = steps`` starts from ``x_1 ~ N(0, I)`` (the ordinary sampler); ``level = j < T``
    from ``u_j = f(x_{t_j})`` of a forward trajectory of ``x0``.
    """
    times, _, u = _true_level(model, x0, steps, level, generator)
    for k in range(level - 1, -1, -1):
        u = _step(model, u, times, k, steps, generator)
    return model.untransport(u, times[:, 0], steps)


@torch.no_grad()
def single_step(
    model: NTM, x0: Tensor, steps: int, level: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One model step from the true level ``level`` to ``level - 1``.

    Returns:
        The model's ``x_{t_{level-1}}`` (mapped back from u-space) and the true
        ``x_{t_{level-1}}`` of the same forward trajectories. For ``level = 1`` the first is
        exactly what :func:`start_from_level` returns with the same generator.
    """
    times, trajectory, u = _true_level(model, x0, steps, level, generator)
    u = _step(model, u, times, level - 1, steps, generator)
    return model.untransport(u, times[:, level - 1], steps), trajectory[:, level - 1]


@torch.no_grad()
def oracle_posterior(
    x_t: Tensor, t: float, reference: Tensor, chunk: int = 1000
) -> tuple[Tensor, Tensor]:
    """Mean and per-dimension variance of ``x_0`` given ``x_t = (1 - t) x_0 + t ε``.

    ``x_0`` is uniform over the points of ``reference``; computed in float64.
    """
    reference = reference.double()
    means, variances = [], []
    for part in x_t.double().split(chunk):
        log_weights = -torch.cdist(part, (1 - t) * reference).square() / (2 * t * t)
        weights = torch.softmax(log_weights, dim=1)
        mean = weights @ reference
        means.append(mean)
        variances.append((weights @ reference.square() - mean.square()).clamp_min(0))
    return torch.cat(means).to(x_t.dtype), torch.cat(variances).to(x_t.dtype)


@torch.no_grad()
def oracle_chain(times: Tensor, reference: Tensor, generator: torch.Generator) -> Tensor:
    """Samples the best diagonal Gaussian reverse chain on the grid ``times`` ``(n, T + 1)``.

    Each step draws ``x_s ~ N(A x_t + B m, C² + B² v)``, ``(m, v)`` from
    :func:`oracle_posterior`: the exact mean and the variance of the true reverse step
    ``∫ q(x_s | x_t, x_0) p(x_0 | x_t) dx_0``, with its correlations across dimensions dropped.
    """
    x = torch.randn(times.shape[0], reference.shape[1], generator=generator)
    for k in range(times.shape[1] - 2, -1, -1):
        t, s = times[:, k + 1], times[:, k]
        a, b, c2 = (v[:, None].float() for v in posterior_coefficients(s, t))
        mean, variance = oracle_posterior(x, float(t[0]), reference)
        std = (c2 + b.square() * variance).sqrt()
        x = a * x + b * mean + std * torch.randn(x.shape, generator=generator)
    return x


@torch.no_grad()
def level_nll(model: NTM, x0: Tensor, steps: int, generator: torch.Generator) -> list[float]:
    """Mean NLL of each factor ``k = 0 … T-1`` of the trajectory likelihood, nats/dim."""
    times = grid(model, x0.shape[0], steps)
    factors = model.factor_log_probs(sample_trajectory(x0, times, generator), times)
    return (-factors[:, :steps].mean(0) / model.dimension).tolist()


def sample_metrics(samples: Tensor, test: Tensor) -> dict[str, float]:
    """Global (SW, energy distance) and local (KDE precision and recall) metrics."""
    seeded = torch.Generator().manual_seed(7)
    return {
        "sliced_wasserstein": sliced_wasserstein(samples, test, generator=seeded),
        "energy_distance": energy_distance(
            samples, test, generator=torch.Generator().manual_seed(7)
        ),
        "kde_precision_nats": kde_cross_entropy(samples, test, BANDWIDTH),
        "kde_recall_nats": kde_cross_entropy(test, samples, BANDWIDTH),
    }


def run(
    dataset: str,
    seed: int = 0,
    iters: int | None = None,
    *,
    eval_points: int | None = None,
    panels: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Trains the NTM and the Gaussian chain on ``dataset`` and takes their samplers apart.

    Returns the JSON payload; fills ``panels`` (if given) with the held-out data and every
    sampler's points, for a scatter figure.
    """
    panels = {} if panels is None else panels
    DATASETS.get(dataset)
    iters = ITERATIONS if iters is None else iters
    points = EVAL_POINTS if eval_points is None else eval_points
    torch.manual_seed(seed)
    models = {
        "ntm": fit(ntm_config().build(), dataset, iters, seed)[1],
        "gaussian_chain": fit(ntm_config(transporter=False).build(), dataset, iters, seed)[1],
    }
    test = sample_dataset(dataset, points, seed=10_000 + seed)
    panels["data"] = test
    x0 = sample_dataset(dataset, points, seed=20_000 + seed)
    records: dict[str, Any] = {
        "by_start_level": [], "single_step": [], "level_nll": [], "metrics": []
    }  # fmt: skip
    for name, model in models.items():
        for steps in DECOMPOSED_STEPS:
            for level in range(steps, 0, -1):
                generator = torch.Generator().manual_seed(seed + 5)
                samples = start_from_level(model, x0, steps, level, generator)
                records["by_start_level"].append({
                    "method": name, "steps": steps, "start_level": level,
                    "sliced_wasserstein": sliced_wasserstein(
                        samples, test, generator=torch.Generator().manual_seed(7)),
                    "mean": samples.mean(0).tolist(),
                })  # fmt: skip
                stepped, truth = single_step(
                    model, x0, steps, level, torch.Generator().manual_seed(seed + 5)
                )
                records["single_step"].append({
                    "method": name, "steps": steps, "level": level,
                    "mean_offset": (stepped.mean(0) - truth.mean(0)).tolist(),
                    "sliced_wasserstein": sliced_wasserstein(
                        stepped, truth, generator=torch.Generator().manual_seed(7)),
                })  # fmt: skip
            nll = level_nll(model, x0, steps, torch.Generator().manual_seed(seed + 3))
            records["level_nll"].append({"method": name, "steps": steps, "nll_per_dim": nll})
        for steps in COMPARED_STEPS:
            samples = model.sample(
                points, steps=steps, generator=torch.Generator().manual_seed(seed + 1)
            )
            panels[f"{name} T={steps}"] = samples
            records["metrics"].append(
                {"method": name, "steps": steps, **sample_metrics(samples, test)}
            )
    reference = sample_dataset(dataset, ORACLE_REFERENCE, seed=30_000 + seed)
    for steps in COMPARED_STEPS:
        times = grid(models["gaussian_chain"], points, steps)
        samples = oracle_chain(times, reference, torch.Generator().manual_seed(seed + 1))
        panels[f"best Gaussian chain T={steps}"] = samples
        records["metrics"].append(
            {"method": "best_gaussian_chain", "steps": steps, **sample_metrics(samples, test)}
        )
    floor = sample_metrics(x0, test)
    return {
        "benchmark": "toy2d_steps", "dataset": dataset, "seed": seed, "iterations": iters,
        "eval_points": points, "t0": T0, "kde_bandwidth": BANDWIDTH,
        "oracle_reference": ORACLE_REFERENCE,
        "data_mean": x0.mean(0).tolist(), "data_vs_data": floor, "fingerprint": fingerprint(),
        **records,
    }  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table([dict(zip(header, row, strict=True)) for row in rows], header)


def _point(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:+.3f}" for v in values) + ")"


def tables(result: dict[str, Any]) -> str:
    """Markdown: error by starting level, one step's offset, per-level NLL, and the metrics."""
    lines = []
    for steps in DECOMPOSED_STEPS:
        rows = []
        for name in ("ntm", "gaussian_chain"):
            picked = [
                r for r in result["by_start_level"] if r["method"] == name and r["steps"] == steps
            ]
            rows.append([f"{name} SW"] + [f"{r['sliced_wasserstein']:.4f}" for r in picked])
            rows.append([f"{name} mean"] + [_point(r["mean"]) for r in picked])
        header = [f"T={steps}, start at j ="] + [str(j) for j in range(steps, 0, -1)]
        lines += [_table(header, rows), ""]
        rows = []
        for name in ("ntm", "gaussian_chain"):
            picked = [
                r for r in result["single_step"] if r["method"] == name and r["steps"] == steps
            ]
            rows.append([f"{name} mean offset"] + [_point(r["mean_offset"]) for r in picked])
        header = [f"T={steps}, one step j → j-1, j ="] + [str(j) for j in range(steps, 0, -1)]
        lines += [_table(header, rows), ""]
    rows = []
    for record in result["level_nll"]:
        rows.append(
            [record["method"], str(record["steps"])] + [f"{v:.3f}" for v in record["nll_per_dim"]]
        )
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines += [_table(["method", "T"] + [f"k={k}" for k in range(width - 2)], rows), ""]
    keys = ("sliced_wasserstein", "energy_distance", "kde_precision_nats", "kde_recall_nats")
    rows = [
        [r["method"], str(r["steps"])] + [f"{r[k]:.4g}" for k in keys] for r in result["metrics"]
    ]
    rows.append(["data vs data", "–"] + [f"{result['data_vs_data'][k]:.4g}" for k in keys])
    lines.append(_table(["method", "T", "SW", "energy", "KDE precision", "KDE recall"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="spirals", help=f"one of {DATASETS.names()}")
    parser.add_argument("--out", help="JSON file to write (PNG beside it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=None, help=f"default {ITERATIONS}")
    parser.add_argument("--eval-points", type=int, default=None, help=f"default {EVAL_POINTS}")
    args = parser.parse_args(argv)
    panels: dict[str, Tensor] = {}
    result = run(args.dataset, args.seed, args.iters, eval_points=args.eval_points, panels=panels)
    print(tables(result))
    if args.out:
        write_json(Path(args.out), result)
        if pyplot() is not None:
            from trajflow.plotting import scatter_grid

            title = f"{args.dataset}: NTM, Gaussian chain and best Gaussian chain at T = 2, 4, 8"
            rows = {**{k: v for k, v in panels.items() if k != "data"}, "data": panels["data"]}
            scatter_grid(
                rows, Path(args.out).with_suffix(".png"), columns=3, limit=3.5, title=title
            )
    return result


if __name__ == "__main__":
    main()
