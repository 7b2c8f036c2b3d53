"""Command line: ``trajflow demo`` and ``trajflow train``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trajflow.data import DATASETS

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> None:
    from trajflow.demo import flow_demo, ntm_demo

    if args.model == "flow":
        iterations = args.iterations or 800
        report = flow_demo(args.dataset, iterations=iterations, seed=args.seed, out_dir=args.out)
        written = ["flow_samples.png", "flow_report.json"]
    else:
        iterations = args.iterations or 2000
        report = ntm_demo(args.dataset, iterations=iterations, seed=args.seed, out_dir=args.out)
        written = ["ntm_vs_fm.png", "ntm_report.json"]
    print(json.dumps(report, indent=2))
    print("wrote " + " and ".join(f"{args.out}/{name}" for name in written))


class ConfigError(Exception):
    """A config file or flag is wrong; the message says which and why."""


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path} is not valid JSON: {error}") from None


def _validated(cls: Any, data: Any, what: str) -> Any:
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid {what}: {error}") from None
    except (KeyError, ValueError, TypeError) as error:  # registry look-ups in validators
        message = error.args[0] if error.args else error
        raise ConfigError(f"invalid {what}: {message}") from None


def _configs(args: argparse.Namespace):
    """The model config (or ``None`` to take the checkpoint's), train config and checkpoint."""
    from trajflow.checkpoint import CONFIG_FILE, latest_checkpoint
    from trajflow.config import ModelConfig, toy_ntm_config
    from trajflow.train import TrainConfig

    checkpoint = None
    if args.resume is not None:
        checkpoint = latest_checkpoint(args.resume)
        if checkpoint is None:
            raise ConfigError(f"no checkpoint to resume from in {args.resume}")

    if args.config is not None:
        model_config = _validated(
            ModelConfig, _read_json(args.config, "model config"), f"model config {args.config}"
        )
    elif checkpoint is None:
        model_config = toy_ntm_config()
    else:
        model_config = None

    if args.train_config is not None:
        base = _read_json(args.train_config, "train config")
        where = f"train config {args.train_config}"
    elif checkpoint is not None:
        base = json.loads((checkpoint / CONFIG_FILE).read_text()).get("train_config") or {}
        where = f"train config of {checkpoint}"
    else:
        base = {"out_dir": "out/train", "iterations": 2000, "checkpoint_every": 500}
        where = "train config"
    if not isinstance(base, dict):
        raise ConfigError(f"invalid {where}: expected a JSON object, got {type(base).__name__}")
    flags = {
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "dataset": args.dataset,
        "out_dir": args.out,
        "seed": args.seed,
        "device": args.device,
    }
    merged = {**base, **{key: value for key, value in flags.items() if value is not None}}
    train_config = _validated(TrainConfig, merged, where + " (with command-line flags)")
    if train_config.out_dir is None:
        train_config = train_config.model_copy(update={"out_dir": "out/train"})
    return model_config, train_config, checkpoint


def _train(args: argparse.Namespace) -> None:
    import torch

    from trajflow.data import sample_dataset
    from trajflow.metrics import sliced_wasserstein
    from trajflow.train import train

    model_config, config, checkpoint = _configs(args)
    model = None
    if model_config is not None:
        try:
            model = model_config.build()
        except (KeyError, ValueError, TypeError) as error:
            message = error.args[0] if error.args else error
            raise ConfigError(f"cannot build the model of {args.config}: {message}") from None
    result = train(
        model,
        config,
        model_config=model_config,
        resume=checkpoint,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    report: dict[str, Any] = {
        "model": type(result.model).__name__,
        "dataset": config.dataset,
        "steps": result.step,
        "final_loss": result.final_loss,
        "skipped_steps": result.skipped_steps,
        "wall_time_s": round(result.wall_time, 2),
        "checkpoint": str(result.checkpoints[-1]) if result.checkpoints else None,
    }
    if args.eval_samples > 0 and hasattr(result.model, "sample"):
        # Sample quality in data units, from the EMA weights when there are some.
        sampler = result.ema if result.ema is not None else result.model
        sampler.eval()
        samples = sampler.sample(
            args.eval_samples, generator=torch.Generator().manual_seed(config.seed)
        )
        data = sample_dataset(config.dataset, args.eval_samples, seed=10_000 + config.seed)
        report["sliced_wasserstein"] = sliced_wasserstein(
            samples.float().cpu(), data, generator=torch.Generator().manual_seed(0)
        )
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trajflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train an NTM (or --model flow: a spline flow) on a toy dataset and plot"
    )
    demo.add_argument("--model", default="ntm", choices=["ntm", "flow"])
    demo.add_argument("--dataset", default="checkerboard", choices=DATASETS.names())
    demo.add_argument("--iterations", type=int, default=None, help="default 2000 (flow: 800)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="out/demo")
    demo.set_defaults(run=_demo)

    train = commands.add_parser(
        "train",
        help="train an NTM or flow-matching model on a toy dataset, with checkpoints",
        description="Train a model from a ModelConfig JSON; flags override the train config.",
    )
    train.add_argument(
        "--config", help="ModelConfig JSON (default: a small NTM for 2-D data, or the checkpoint's)"
    )
    train.add_argument(
        "--train-config", help="TrainConfig JSON (default: the checkpoint's when resuming)"
    )
    train.add_argument("--iterations", type=int, help="total steps")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--dataset", choices=DATASETS.names())
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    train.add_argument("--out", help="checkpoint folder (default: out/train)")
    train.add_argument("--resume", help="checkpoint folder, or run folder to take the newest from")
    train.add_argument(
        "--eval-samples",
        type=int,
        default=2000,
        help="samples for the final sliced Wasserstein distance to the data (0: skip)",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(run=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trajflow`` command.

    Configuration mistakes print a message naming the wrong field and exit with status 2.
    """
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as error:
        print(f"trajflow {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
