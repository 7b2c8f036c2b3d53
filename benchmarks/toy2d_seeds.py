"""Training-seed spread of the toy benchmark's NTM: is "eight steps no worse than four" real?

`toy2d.py` trains each method once (one training seed). Between two training seeds of the same
NTM, the ratio SW(T = 8) / SW(T = 4) moves by more than any change tried to the model, so a
one-seed verdict on "more steps never hurt" says little. This script trains the NTM from
scratch of `toy2d.py` (same config, budget, EMA, held-out data and sampling seeds) once per
training seed and reports, per seed, sliced Wasserstein at ``T = 1, 2, 4, 8`` and the ratio
``T8 / T4``; then the mean ratio, its spread and how many seeds meet ``T8 ≤ T4``.

Seed ``s`` reproduces the ``ntm`` rows of ``toy2d.py --seed s`` exactly (same initial weights,
data stream, held-out points and sampling seeds). Three settings change that NTM, each judged
over the same seeds: the x̂₀ regression term (``--x0-mse-weight``), the step counts ``T`` is
drawn from in training (``--train-steps``) and the training mode (``--mode end_to_end``: every
transition of each trajectory scored instead of one).

Usage:
    python benchmarks/toy2d_seeds.py --dataset spirals --seeds 0 1 2 \\
        --out out/toy2d_seeds_spirals.json
    python benchmarks/toy2d_seeds.py --dataset spirals --train-steps 4 8 \\
        --out out/toy2d_seeds_steps4-8_spirals.json
    python benchmarks/toy2d_seeds.py --summarize benchmarks/results/toy2d_seeds_*.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy2d
from _common import Target, fingerprint, markdown_table, summarize, write_json

from trajflow import DATASETS, sample_dataset
from trajflow.metrics import sliced_wasserstein

#: Step counts every seed's model is sampled at.
STEPS = [1, 2, 4, 8]


def evaluate(
    model: torch.nn.Module,
    dataset: str,
    seed: int,
    points: int,
    steps_list: list[int] | None = None,
) -> dict[int, list[float]]:
    """SW of ``model`` at each step count, one value per sampling seed of ``toy2d.py``.

    The held-out points, sampling seeds and projections are ``toy2d.py``'s for ``seed``;
    ``steps_list`` defaults to :data:`STEPS`.
    """
    test = sample_dataset(dataset, points, seed=10_000 + seed)
    found = {}
    for steps in STEPS if steps_list is None else steps_list:
        found[steps] = []
        for index in range(toy2d.SAMPLE_SEEDS):
            generator = torch.Generator().manual_seed(seed + 1 + index)
            with torch.no_grad():
                samples = model.sample(points, steps=steps, generator=generator)
            finite = samples[torch.isfinite(samples).all(dim=1)]
            projections = torch.Generator().manual_seed(seed + 1)
            found[steps].append(sliced_wasserstein(finite, test, generator=projections))
    return found


def run(
    dataset: str,
    seeds: list[int],
    iters: int | None = None,
    *,
    eval_points: int | None = None,
    x0_mse_weight: float = 0.0,
    train_steps: list[int] | None = None,
    mode: Literal["pairwise", "end_to_end"] = "pairwise",
) -> dict[str, Any]:
    """Trains and evaluates the benchmark's NTM once per training seed; returns the JSON payload.

    Args:
        dataset: A registered ``trajflow.DATASETS`` name.
        seeds: Training seeds (each also seeds its data, held-out points and sampling).
        iters: Training iterations (default ``toy2d.ITERATIONS``).
        eval_points: Samples and held-out points per evaluation (default ``toy2d.EVAL_POINTS``).
        x0_mse_weight: Weight of the NTM's x̂₀ regression term (``0``: the ``toy2d.py`` NTM).
        train_steps: The step counts ``T`` is drawn from in training (default
            ``toy2d.TRAIN_STEPS``); the model is still sampled at every ``T`` of :data:`STEPS`.
        mode: ``"pairwise"`` (``toy2d.py``'s NTM: one transition scored per trajectory) or
            ``"end_to_end"`` (every transition scored).
    """
    DATASETS.get(dataset)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"expected distinct training seeds, got {seeds}")
    iters = toy2d.ITERATIONS if iters is None else iters
    points = toy2d.EVAL_POINTS if eval_points is None else eval_points
    train_steps = list(toy2d.TRAIN_STEPS) if train_steps is None else sorted(train_steps)
    default = (x0_mse_weight, train_steps, mode) == (0.0, list(toy2d.TRAIN_STEPS), "pairwise")
    # Built (and so validated) before any seed trains.
    config = toy2d.ntm_config(x0_mse_weight=x0_mse_weight, train_steps=train_steps, mode=mode)
    records = []
    for seed in seeds:
        torch.manual_seed(seed)  # as toy2d.run does before building its first model
        start = time.perf_counter()
        _, ema = toy2d.fit(config.build(), dataset, iters, seed)
        seconds = time.perf_counter() - start
        per_seed = evaluate(ema, dataset, seed, points)
        sw = {steps: sum(values) / len(values) for steps, values in per_seed.items()}
        records.append({
            "seed": seed,
            "sliced_wasserstein": {str(steps): value for steps, value in sw.items()},
            "sliced_wasserstein_per_sample_seed": {str(s): v for s, v in per_seed.items()},
            "ratio_8_4": sw[8] / sw[4],
            "train_seconds": seconds,
        })  # fmt: skip
    ratios = [record["ratio_8_4"] for record in records]

    def mean_at(steps: int) -> float:
        return statistics.fmean(record["sliced_wasserstein"][str(steps)] for record in records)

    return {
        "benchmark": "toy2d_seeds",
        "dataset": dataset,
        "seeds": seeds,
        "fingerprint": fingerprint(),
        "settings": {
            "iterations": iters,
            "batch_size": toy2d.BATCH,
            "eval_points": points,
            "sample_seeds": toy2d.SAMPLE_SEEDS,
            "model": "the ntm row of toy2d.py"
            + ("" if default else " with the x̂₀ term, step counts and mode below"),
            "x0_mse_weight": x0_mse_weight,
            "train_steps": train_steps,
            "mode": mode,
        },
        "records": records,
        "summary": {
            "ratio_8_4_mean": statistics.fmean(ratios),
            "ratio_8_4_stdev": statistics.stdev(ratios) if len(ratios) > 1 else None,
            "ratio_of_means_8_4": mean_at(8) / mean_at(4),
            "seeds_meeting_8_le_4": sum(ratio <= 1 for ratio in ratios),
            "sliced_wasserstein_mean": {str(steps): mean_at(steps) for steps in STEPS},
        },
        "targets": [ratio_target(mean_at(8) / mean_at(4)).as_dict()],
    }


def ratio_target(ratio_of_means: float) -> Target:
    """More steps never hurt, over seeds: mean SW at ``T = 8`` ≤ mean SW at ``T = 4``."""
    return Target("NTM T=8 SW / T=4 SW, means over training seeds", ratio_of_means, 1.0)


def changes(settings: dict[str, Any]) -> str:
    """What a run changed in ``toy2d.py``'s NTM, for the summary table (results of older
    versions of this script lack the step counts and mode: they used the defaults)."""
    found = []
    if settings.get("x0_mse_weight", 0.0):
        found.append(f"x̂₀ term {settings['x0_mse_weight']:g}")
    steps = settings.get("train_steps", toy2d.TRAIN_STEPS)
    if steps != toy2d.TRAIN_STEPS:
        found.append("T ∈ {" + ", ".join(map(str, steps)) + "}")
    if settings.get("mode", "pairwise") != "pairwise":
        found.append(settings["mode"].replace("_", "-"))
    return ", ".join(found) or "toy2d.py NTM"


def summary_table(results: list[dict[str, Any]]) -> str:
    """One markdown row per run: T=4 and T=8 SW per seed, the ratios and the verdicts."""
    rows = []
    for result in results:
        summary = result["summary"]
        rows.append({
            "dataset": result["dataset"],
            "changed": changes(result["settings"]),
            "seeds": " / ".join(str(r["seed"]) for r in result["records"]),
            "T=4 SW": " / ".join(f"{r['sliced_wasserstein']['4']:.4f}" for r in result["records"]),
            "T=8 SW": " / ".join(f"{r['sliced_wasserstein']['8']:.4f}" for r in result["records"]),
            "T8/T4": " / ".join(f"{r['ratio_8_4']:.2f}" for r in result["records"]),
            "mean T8/T4": summary["ratio_8_4_mean"],
            "T8/T4 of the mean SWs": summary["ratio_of_means_8_4"],
            "T8 ≤ T4": f"{summary['seeds_meeting_8_le_4']} of {len(result['records'])}",
        })  # fmt: skip
    return markdown_table(rows, list(rows[0]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="spirals", help=f"one of {DATASETS.names()}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None, help=f"default {toy2d.ITERATIONS}")
    parser.add_argument(
        "--x0-mse-weight", type=float, default=0.0,
        help="weight of the NTM's x̂₀ regression term (default 0: the toy2d.py NTM)",
    )  # fmt: skip
    parser.add_argument(
        "--train-steps", type=int, nargs="+", default=None,
        help=f"step counts T is drawn from in training (default {toy2d.TRAIN_STEPS})",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=["pairwise", "end_to_end"], default="pairwise",
        help="transitions scored per trajectory: one (pairwise, default) or all (end_to_end)",
    )  # fmt: skip
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="summarize result files")
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, summary_table)
    if not args.out:
        parser.error("--out is required (or --summarize FILES)")
    result = run(
        args.dataset, args.seeds, args.iters, x0_mse_weight=args.x0_mse_weight,
        train_steps=args.train_steps, mode=args.mode,
    )  # fmt: skip
    write_json(args.out, result)
    print(summary_table([result]))
    print(ratio_target(result["summary"]["ratio_of_means_8_4"]).line())
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
