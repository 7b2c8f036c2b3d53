"""How the text-conditioned predictor's cost grows with the number of trajectory levels ``K``.

With Markov level attention, each level attends to its own tokens and the prompt only, so a
training pass over ``K`` levels should cost ``K`` times one level. The trajectory transformer
folds the levels into the batch and runs the prompt once per sample (its keys and values
shared by every level). The quadratic reference is the same network with ``causal`` level
attention, where every level attends to all noisier ones in one long sequence.

Reports forward+backward milliseconds per ``K`` and the ratio ``time(K) / (K · time(1))``
(1 = linear). Target: the Markov ratio stays ≤ 1.25 at the largest ``K``.

    python benchmarks/predictor_levels.py --out benchmarks/results/predictor_levels_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Target, fingerprint, markdown_table, pyplot, timeit, write_json

from trajflow import PREDICTORS


def measure(attention: str, levels: int, args: argparse.Namespace) -> float:
    """Forward+backward seconds of one pass over ``levels`` levels with a text prefix."""
    generator = torch.Generator().manual_seed(0)
    net = PREDICTORS.build(
        "trajectory_transformer",
        features=args.features,
        tokens=args.tokens,
        dim=args.dim,
        layers=args.layers,
        heads=4,
        level_attention=attention,
        cond_features=args.dim,
        time_features=32,
    )
    batch = args.batch
    u = torch.randn(batch, levels, args.tokens, args.features, generator=generator)
    t_in = torch.rand(batch, levels, generator=generator)
    y = torch.randn(batch, args.prompt, args.dim, generator=generator)
    mask = torch.ones(batch, args.prompt, dtype=torch.bool)

    def step() -> None:
        mean, delta = net(u, t_in, 0.5 * t_in, torch.full((batch,), levels), y, mask)
        (mean.square().mean() + delta.mean()).backward()

    return timeit(step, warmup=args.warmup, repeats=args.repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per level (small: 16)")
    parser.add_argument("--features", type=int, default=48)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=10, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.levels) != 1 or any(k < 1 for k in args.levels):
        parser.error("--levels must be positive and include 1 (the reference)")

    records = []
    for attention in ("markov", "causal"):
        single = None
        for levels in sorted(args.levels):
            seconds = measure(attention, levels, args)
            single = seconds if levels == 1 else single
            records.append(
                {
                    "attention": attention,
                    "levels": levels,
                    "ms": 1e3 * seconds,
                    "ratio_to_linear": seconds / (levels * single),
                }
            )
    largest = max(args.levels)
    markov = next(r for r in records if r["attention"] == "markov" and r["levels"] == largest)
    targets = [Target(f"markov time(K={largest}) / (K · time(1))", markov["ratio_to_linear"], 1.25)]
    payload = {
        "fingerprint": fingerprint(),
        "settings": vars(args),
        "records": records,
        "targets": [target.as_dict() for target in targets],
    }
    write_json(args.out, payload)
    print(markdown_table(records, ["attention", "levels", "ms", "ratio_to_linear"]))
    for target in targets:
        print(target.line())
    plt = pyplot()
    if plt is not None:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for attention in ("markov", "causal"):
            rows = [r for r in records if r["attention"] == attention]
            axis.plot([r["levels"] for r in rows], [r["ms"] for r in rows], "o-", label=attention)
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="levels K",
            ylabel="forward+backward ms",
            title="predictor cost vs levels (with a prompt)",
        )
        axis.legend()
        figure.tight_layout()
        figure.savefig(Path(args.out).with_suffix(".png"), dpi=120)
    return payload


if __name__ == "__main__":
    main()
