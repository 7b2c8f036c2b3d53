"""Command line: ``trajflow demo`` (and later subcommands)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from trajflow.data import DATASETS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> None:
    from trajflow.demo import flow_demo

    report = flow_demo(
        dataset=args.dataset, iterations=args.iterations, seed=args.seed, out_dir=args.out
    )
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}/flow_samples.png and {args.out}/flow_report.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trajflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small model on a toy dataset and plot samples")
    demo.add_argument("--dataset", default="checkerboard", choices=DATASETS.names())
    demo.add_argument("--iterations", type=int, default=800)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="out/demo")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trajflow`` command."""
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
