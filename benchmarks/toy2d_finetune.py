"""What moves the finetuned NTM at four steps? The paper's recipe with one setting changed.

`toy2d.py`'s finetuned NTM (flow matching for half the budget, then
:meth:`~trajflow.ntm.NTM.from_flow_matching` with the mean-alignment loss for the other half)
misses "four NTM steps ≤ a hundred Euler steps" on every dataset. This script trains that row
with one or more settings of the recipe replaced (pretraining share, auxiliary weight,
transporter depth, width and spline bins, finetuning learning rate, time grid, training mode,
trained step counts, budget) and reports sliced Wasserstein at ``T = 2, 4, 8`` (the means over
``toy2d.SAMPLE_SEEDS`` sampling seeds, on the held-out points of ``toy2d.py``), beside flow
matching with 100 Euler steps at the same budget: trained here, or read from a ``toy2d.py``
result of the same dataset, seed and budget (``--fm-from``), which saves its training.

The model is built right after ``torch.manual_seed(seed)``, so its initial weights differ
from the ``ntm_finetuned`` row of ``toy2d.py``, which builds the NTM from scratch first; the
run with no setting changed is the baseline to compare against.

Usage:
    python benchmarks/toy2d_finetune.py --dataset checkerboard --variant aux0 \\
        --fm-from benchmarks/results/toy2d_checkerboard.json --out out/ft_aux0.json
    python benchmarks/toy2d_finetune.py --dataset checkerboard --transporter-layers 8 \\
        --transporter-hidden 128 128 --pretrain-fraction 0.25 --out out/ft_big.json
    python benchmarks/toy2d_finetune.py --summarize benchmarks/results/toy2d_finetune_*.json \\
        --plot out/toy2d_finetune.png
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy2d
from _common import Target, fingerprint, markdown_table, pyplot, write_json
from toy2d_seeds import evaluate

from trajflow import DATASETS, sample_dataset
from trajflow.config import ModelConfig
from trajflow.metrics import sliced_wasserstein

#: Step counts the finetuned NTM is sampled at, and flow matching's reference.
NTM_STEPS, FM_STEPS = [2, 4, 8], 100
#: The sweep of ``make bench-toy-finetune`` (``--variant NAME``): arguments of :func:`run`.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "aux0": {"aux_weight": 0.0},
    "pretrain0.25": {"pretrain_fraction": 0.25},
    "pretrain0.75": {"pretrain_fraction": 0.75},
    "wide": {"transporter_hidden": [128, 128]},
    "lr5e-4": {"finetune_lr": 5e-4},
    "lr4e-3": {"finetune_lr": 4e-3},
    "shift-0.5": {"grid_shift": -0.5},
    "shift-0.75": {"grid_shift": -0.75},
    "deep_wide": {
        "transporter_layers": 8,
        "transporter_hidden": [128, 128],
        "pretrain_fraction": 0.25,
    },
    "e2e": {"mode": "end_to_end"},
    "e2e_shift-0.75": {"mode": "end_to_end", "grid_shift": -0.75},
    "e2e_steps4-8": {"mode": "end_to_end", "train_steps": [4, 8]},
    "e2e_shift-0.75_steps4-8": {"mode": "end_to_end", "grid_shift": -0.75, "train_steps": [4, 8]},
    "e2e_bins32": {"mode": "end_to_end", "transporter_bins": 32},
    "e2e_deep_wide": {
        "mode": "end_to_end",
        "transporter_layers": 8,
        "transporter_hidden": [128, 128],
    },
    "budget2x": {"iters": 2 * toy2d.ITERATIONS},
}


def recipe(
    pretrain_fraction: float | None = None,
    aux_weight: float | None = None,
    transporter_layers: int | None = None,
    transporter_hidden: list[int] | None = None,
    transporter_bins: int | None = None,
    finetune_lr: float | None = None,
    grid_shift: float | None = None,
    mode: str | None = None,
    train_steps: list[int] | None = None,
) -> dict[str, Any]:
    """Every setting of the recipe, ``toy2d.py``'s where an argument is ``None``.

    ``grid_shift`` μ ≠ 0 trains and samples on the shifted time grid of
    :class:`~trajflow.schedules.ShiftedGrid` (μ < 0: levels closer to the data) instead of
    the uniform one. ``mode="end_to_end"`` scores every transition of each trajectory in
    the finetuning phase instead of one random pair (``"pairwise"``): as many batches, about
    ``T`` times the predictor work per step. ``transporter_bins`` sets every spline's
    number of bins (``toy2d.py``: 8). ``train_steps`` is the set of ``T`` drawn in
    finetuning (``toy2d.py``: 2, 4 and 8); ``T = 2`` left out, the model's capacity and
    batches go to the step counts the targets compare.
    """
    given = {
        "pretrain_fraction": pretrain_fraction,
        "aux_weight": aux_weight,
        "transporter_layers": transporter_layers,
        "transporter_hidden": None if transporter_hidden is None else list(transporter_hidden),
        "transporter_bins": transporter_bins,
        "finetune_lr": finetune_lr,
        "grid_shift": grid_shift,
        "mode": mode,
        "train_steps": None if train_steps is None else sorted(train_steps),
    }
    benchmark = toy2d.ntm_config()
    default = {
        "pretrain_fraction": toy2d.PRETRAIN_FRACTION,
        "aux_weight": toy2d.AUX_WEIGHT,
        "transporter_layers": toy2d.TRANSPORTER_LAYERS,
        "transporter_hidden": list(toy2d.TRANSPORTER_HIDDEN),
        "transporter_bins": benchmark.transporter[0].kwargs["bins"],
        "finetune_lr": toy2d.LR,
        "grid_shift": 0.0,
        "mode": benchmark.mode,
        "train_steps": list(toy2d.TRAIN_STEPS),
    }
    return {key: default[key] if value is None else value for key, value in given.items()}


def changes(settings: dict[str, Any]) -> str:
    """The settings that differ from ``toy2d.py``'s, e.g. ``"aux_weight=0"``."""
    default = recipe()
    changed = [f"{key}={value}" for key, value in settings.items() if value != default[key]]
    return ", ".join(changed) or "toy2d.py recipe"


def fm_reference(path: str | Path, dataset: str, seed: int, iters: int) -> float:
    """FM Euler-100 SW from a ``toy2d.py`` result, checked to be the same dataset and budget."""
    result = json.loads(Path(path).read_text())
    iterations = result.get("settings", {}).get("iterations")
    found = (result.get("dataset"), result.get("seed"), iterations)
    if found != (dataset, seed, iters):
        raise ValueError(
            f"{path}: expected a toy2d.py result for dataset={dataset!r}, seed={seed}, "
            f"iterations={iters}; it holds dataset={found[0]!r}, seed={found[1]}, "
            f"iterations={found[2]}"
        )
    for record in result.get("records", []):
        if record.get("method") == "flow_matching" and record.get("steps") == FM_STEPS:
            return record["sliced_wasserstein"]
    raise ValueError(f"{path}: no flow_matching record with {FM_STEPS} steps")


def run(
    dataset: str,
    seed: int = 0,
    iters: int | None = None,
    *,
    fm_from: str | Path | None = None,
    eval_points: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Trains the finetuned NTM with ``settings`` (see :func:`recipe`); returns the payload.

    Args:
        dataset: A registered ``trajflow.DATASETS`` name.
        seed: Seeds initialisation, data, held-out points and sampling, as in ``toy2d.py``.
        iters: Total training iterations of the recipe and of flow matching.
        fm_from: A ``toy2d.py`` JSON to read FM Euler 100 from instead of training it.
        eval_points: Samples and held-out points per evaluation.
        **settings: Arguments of :func:`recipe`.
    """
    DATASETS.get(dataset)
    iters = toy2d.ITERATIONS if iters is None else iters
    points = toy2d.EVAL_POINTS if eval_points is None else eval_points
    chosen = recipe(**settings)
    # Check the reference before spending the training on it.
    fm_sw = None if fm_from is None else fm_reference(fm_from, dataset, seed, iters)
    torch.manual_seed(seed)
    start = time.perf_counter()
    config = toy2d.ntm_config(
        transporter_layers=chosen["transporter_layers"],
        transporter_hidden=chosen["transporter_hidden"],
        train_steps=chosen["train_steps"],
        mode=chosen["mode"],
    ).model_dump()
    for spec in config["transporter"]:
        spec["kwargs"]["bins"] = chosen["transporter_bins"]
    if chosen["grid_shift"]:
        config["schedule"].update(grid="shifted", shift=chosen["grid_shift"])
    # Validated (model_copy would not be): a bad mode or a grid whose t_1 falls below t_min
    # fails here, not after the pretraining.
    config = ModelConfig.model_validate(config)
    _, model = toy2d.finetuned_ntm(
        dataset,
        iters,
        seed,
        pretrain_fraction=chosen["pretrain_fraction"],
        aux_weight=chosen["aux_weight"],
        config=config,
        finetune_lr=chosen["finetune_lr"],
    )
    seconds = time.perf_counter() - start
    per_seed = evaluate(model, dataset, seed, points, NTM_STEPS)
    sw = {str(steps): sum(values) / len(values) for steps, values in per_seed.items()}
    fm_record = {"source": str(fm_from)}
    if fm_sw is None:
        torch.manual_seed(seed)
        _, fm = toy2d.fit(toy2d.fm_config().build(), dataset, iters, seed)
        fm_values = evaluate(fm, dataset, seed, points, [FM_STEPS])[FM_STEPS]
        fm_sw = sum(fm_values) / len(fm_values)
        fm_record = {"source": "trained here", "per_sample_seed": fm_values}
    return {
        "benchmark": "toy2d_finetune",
        "dataset": dataset,
        "seed": seed,
        "fingerprint": fingerprint(),
        "settings": {
            "iterations": iters,
            "batch_size": toy2d.BATCH,
            "eval_points": points,
            "sample_seeds": toy2d.SAMPLE_SEEDS,
            "recipe": chosen,
            "changed": changes(chosen),
        },
        "finetuned": {
            "sliced_wasserstein": sw,
            "sliced_wasserstein_per_sample_seed": {str(s): v for s, v in per_seed.items()},
            "train_seconds": seconds,
        },
        "flow_matching": {"steps": FM_STEPS, "sliced_wasserstein": fm_sw, **fm_record},
        "targets": [target.as_dict() for target in targets(sw["4"], sw["8"], fm_sw)],
    }


def targets(ft4: float, ft8: float, fm100: float) -> list[Target]:
    """Item 11's targets that this script can check: FT@4 ≤ FM@100 and FT@8 ≤ FT@4."""
    return [
        Target(f"NTM-FT T=4 SW / FM Euler {FM_STEPS} SW", ft4 / fm100, 1.0),
        Target("NTM-FT T=8 SW / NTM-FT T=4 SW", ft8 / ft4, 1.0),
    ]


def in_sweep_order(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` by dataset, then as in :data:`VARIANTS` (runs without a variant last)."""
    order = list(VARIANTS)

    def key(result: dict[str, Any]) -> tuple[str, int]:
        variant = result["settings"].get("variant")
        return result["dataset"], order.index(variant) if variant in order else len(order)

    return sorted(results, key=key)


@functools.cache
def data_floor(dataset: str, seed: int, points: int) -> float:
    """SW of fresh draws of the data against the held-out points: what a perfect model scores.

    The mean over ``toy2d.SAMPLE_SEEDS`` draws, with ``toy2d.py``'s held-out points and
    projections for ``seed``.
    """
    test = sample_dataset(dataset, points, seed=10_000 + seed)
    values = [
        sliced_wasserstein(
            sample_dataset(dataset, points, seed=20_000 + seed + index),
            test,
            generator=torch.Generator().manual_seed(seed + 1),
        )
        for index in range(toy2d.SAMPLE_SEEDS)
    ]
    return sum(values) / len(values)


def summary_table(results: list[dict[str, Any]]) -> str:
    """One markdown row per result: what changed, SW at each ``T``, FM@100, floor, ratios."""
    rows = []
    for result in in_sweep_order(results):
        sw = result["finetuned"]["sliced_wasserstein"]
        fm = result["flow_matching"]["sliced_wasserstein"]
        settings = result["settings"]
        floor = data_floor(result["dataset"], result["seed"], settings["eval_points"])
        rows.append({
            "dataset": result["dataset"],
            "variant": settings.get("variant") or "-",
            "changed": settings["changed"],
            "iters": settings["iterations"],
            "FT T=2": sw["2"], "FT T=4": sw["4"], "FT T=8": sw["8"],
            f"FM {FM_STEPS}": fm,
            "data floor": floor,
            "FT4 / FM100": sw["4"] / fm,
            "FT8 / FT4": sw["8"] / sw["4"],
        })  # fmt: skip
    return markdown_table(rows, list(rows[0]))


def plot(results: list[dict[str, Any]], path: str | Path) -> None:
    """Bars of FT@4 and FT@8 per result, FM@100 of the same budget and the data's floor."""
    plt = pyplot()
    if plt is None:
        return
    results = in_sweep_order(results)
    labels = [r["settings"].get("variant") or r["settings"]["changed"] for r in results]
    positions = range(len(results))
    figure, axes = plt.subplots(figsize=(1.1 * len(results) + 2, 3.6))
    for offset, steps in ((-0.2, "4"), (0.2, "8")):
        heights = [r["finetuned"]["sliced_wasserstein"][steps] for r in results]
        axes.bar([x + offset for x in positions], heights, width=0.4, label=f"FT T={steps}")
    fm = [r["flow_matching"]["sliced_wasserstein"] for r in results]
    axes.scatter(positions, fm, marker="_", s=900, color="black", label=f"FM Euler {FM_STEPS}")
    floor = [data_floor(r["dataset"], r["seed"], r["settings"]["eval_points"]) for r in results]
    axes.scatter(positions, floor, marker="_", s=900, color="grey", label="data vs data")
    axes.set_xticks(list(positions), labels, rotation=30, ha="right")
    axes.set_ylabel("sliced Wasserstein")
    axes.set_title(f"finetuned NTM, one recipe setting changed ({results[0]['dataset']})")
    axes.set_ylim(0, 1.3 * axes.get_ylim()[1])  # room for the legend above the bars
    axes.legend(fontsize="small", ncol=4, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="checkerboard", help=f"one of {DATASETS.names()}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=None, help=f"default {toy2d.ITERATIONS}")
    parser.add_argument("--variant", choices=list(VARIANTS), help="a named setting of the sweep")
    parser.add_argument("--pretrain-fraction", type=float, help="share of FM pretraining")
    parser.add_argument("--aux-weight", type=float, help="λ of the mean-alignment loss")
    parser.add_argument("--transporter-layers", type=int, help="spline couplings")
    parser.add_argument("--transporter-hidden", type=int, nargs="+", help="their widths")
    parser.add_argument("--transporter-bins", type=int, help="bins of each spline")
    parser.add_argument("--finetune-lr", type=float, help="peak learning rate of finetuning")
    parser.add_argument("--grid-shift", type=float, help="μ of a shifted time grid (0: uniform)")
    parser.add_argument(
        "--mode", choices=["pairwise", "end_to_end"], help="transitions scored per trajectory"
    )
    parser.add_argument(
        "--train-steps", type=int, nargs="+", help="the step counts T drawn in finetuning"
    )
    parser.add_argument("--fm-from", metavar="JSON", help="read FM@100 from a toy2d.py result")
    parser.add_argument("--out", help="JSON file to write")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="summarize result files")
    parser.add_argument("--plot", metavar="PNG", help="with --summarize: a bar chart")
    args = parser.parse_args(argv)
    if args.summarize:
        results = [json.loads(Path(name).read_text()) for name in args.summarize]
        print(summary_table(results))
        if args.plot:
            plot(results, args.plot)
        return {"summary": results}
    if not args.out:
        parser.error("--out is required (or --summarize FILES)")
    given = {
        "iters": args.iters,
        "pretrain_fraction": args.pretrain_fraction,
        "aux_weight": args.aux_weight,
        "transporter_layers": args.transporter_layers,
        "transporter_hidden": args.transporter_hidden,
        "transporter_bins": args.transporter_bins,
        "finetune_lr": args.finetune_lr,
        "grid_shift": args.grid_shift,
        "mode": args.mode,
        "train_steps": args.train_steps,
    }
    if args.variant:
        clash = [key for key, value in given.items() if value is not None]
        if clash:
            parser.error(f"--variant {args.variant} sets the recipe; drop {clash}")
        given.update(VARIANTS[args.variant])
    result = run(args.dataset, args.seed, fm_from=args.fm_from, **given)
    result["settings"]["variant"] = args.variant
    write_json(args.out, result)
    print(summary_table([result]))
    sw = result["finetuned"]["sliced_wasserstein"]
    for target in targets(sw["4"], sw["8"], result["flow_matching"]["sliced_wasserstein"]):
        print(target.line())
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
