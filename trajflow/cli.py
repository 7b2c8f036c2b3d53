"""Command line: ``trajflow demo``, ``train``, ``sample`` and ``eval``.

Every mistake a user can fix (a missing file, invalid JSON, an unknown name, a bad value, a
damaged checkpoint, an output that cannot be written) prints ``trajflow <command>: error: …``
naming what was expected and exits with status 2: no traceback, and no partial output file
(outputs are written under a temporary name, then renamed into place).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trajflow.data import DATASETS

__all__ = ["ConfigError", "main"]

#: What ``trajflow sample --out`` can write, by suffix.
SAMPLE_FORMATS = (".png", ".npy", ".pt")


class ConfigError(Exception):
    """A file, flag or checkpoint is wrong; the message says which and why."""


# ----------------------------------------------------------------------------- helpers
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
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


def _check_writable(path: Path, what: str) -> None:
    """Fails early, before any long computation, if ``path`` cannot be written."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; expected a file name")
    folder = path.parent
    while not folder.exists():  # the folders to create must hang off a writable one
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write {what} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what} {path}: {folder} is not writable")


@contextlib.contextmanager
def _atomic_output(path: Path, what: str) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is renamed to ``path``.

    The temporary file lives in a hidden folder next to ``path`` (same file system, so the
    rename is atomic) and is removed whatever happens: ``path`` is either the complete new
    file or untouched.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as error:
        raise ConfigError(f"cannot write {what} {path}: {error.strerror or error}") from None
    try:
        yield folder / path.name
        os.replace(folder / path.name, path)
    except OSError as error:
        raise ConfigError(f"cannot write {what} {path}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_json(path: Path, data: Any, what: str) -> None:
    text = json.dumps(data, indent=2)
    with _atomic_output(path, what) as temporary:
        temporary.write_text(text + "\n")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}") from None


def _load_for_sampling(args: argparse.Namespace):
    """The checkpoint's model in eval mode (EMA weights per ``--weights``), and facts about it."""
    from trajflow.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    checkpoint = latest_checkpoint(args.checkpoint)
    if checkpoint is None:
        raise ConfigError(
            f"no checkpoint in {args.checkpoint}: expected a checkpoint folder (with config.json "
            "and weights.safetensors) or a run folder with step_* checkpoints"
        )
    device = _device(args.device)
    try:
        model, state = load_checkpoint(checkpoint)
    except (FileNotFoundError, CheckpointError) as error:
        raise ConfigError(str(error)) from None
    except (ValueError, RuntimeError) as error:  # no model config; weights of another model
        raise ConfigError(f"cannot load {checkpoint}: {error}") from None
    weights = args.weights
    if weights == "auto":
        weights = "ema" if state.ema is not None else "model"
    if weights == "ema":
        if state.ema is None:
            raise ConfigError(
                f"{checkpoint} has no EMA weights (trained without ema_decay); use --weights model"
            )
        model.load_state_dict(state.ema, strict=True)
    if not callable(getattr(model, "sample", None)):
        raise ConfigError(f"{checkpoint} holds a {type(model).__name__}, which cannot sample")
    model = model.to(device).eval()
    facts = {"checkpoint": str(checkpoint), "model": type(model).__name__, "weights": weights}
    return model, state, facts


def _sample_points(model, n: int, steps: int | None, seed: int):
    """``n`` samples with ``steps`` steps (default: the model's own), on the CPU in float32."""
    import torch

    kwargs = {} if steps is None else {"steps": steps}
    if type(model).__name__ == "FlowMatching":
        kwargs["method"] = "euler"
    samples = model.sample(n, generator=torch.Generator().manual_seed(seed), **kwargs)
    return samples.float().cpu()


def _default_steps(model) -> int:
    import inspect

    return inspect.signature(model.sample).parameters["steps"].default


# ----------------------------------------------------------------------------- demo
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


# ----------------------------------------------------------------------------- train
def _configs(args: argparse.Namespace):
    """The model config (or ``None`` to take the checkpoint's), train config and checkpoint."""
    from trajflow.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint_config
    from trajflow.config import ModelConfig, toy_ntm_config
    from trajflow.train import TrainConfig

    checkpoint, saved = None, None
    if args.resume is not None:
        checkpoint = latest_checkpoint(args.resume)
        if checkpoint is None:
            raise ConfigError(f"no checkpoint to resume from in {args.resume}")
        try:
            saved = read_checkpoint_config(checkpoint)
        except (FileNotFoundError, CheckpointError) as error:
            raise ConfigError(str(error)) from None

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
    elif saved is not None:
        base = saved.get("train_config") or {}
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
        "checkpoint_every": args.checkpoint_every,
        "keep_last": args.keep_last,
    }
    merged = {**base, **{key: value for key, value in flags.items() if value is not None}}
    train_config = _validated(TrainConfig, merged, where + " (with command-line flags)")
    if train_config.out_dir is None:
        train_config = train_config.model_copy(update={"out_dir": "out/train"})
    return model_config, train_config, checkpoint


def _train(args: argparse.Namespace) -> None:
    from trajflow.checkpoint import CheckpointError
    from trajflow.metrics import sliced_wasserstein
    from trajflow.train import init_model, train

    model_config, config, checkpoint = _configs(args)
    model = None
    if model_config is not None:
        try:  # initial weights seeded from the train config's seed: reruns are reproducible
            model = init_model(model_config, config.seed)
        except (KeyError, ValueError, TypeError) as error:
            message = error.args[0] if error.args else error
            raise ConfigError(f"cannot build the model of {args.config}: {message}") from None
    out = Path(config.out_dir)
    _check_writable(out / "train_report.json", "the run folder's report")
    try:
        result = train(
            model,
            config,
            model_config=model_config,
            resume=checkpoint,
            progress=not args.no_progress,
        )
    except (CheckpointError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    except RuntimeError as error:
        if checkpoint is None or "state_dict" not in str(error):
            raise
        raise ConfigError(f"--config does not match the model of {checkpoint}: {error}") from None
    if int(os.environ.get("RANK", "0")) != 0:
        return
    report: dict[str, Any] = {
        "model": type(result.model).__name__,
        "dataset": config.dataset,
        "steps": result.step,
        "final_loss": _finite_or_none(result.final_loss),
        "skipped_steps": result.skipped_steps,
        "wall_time_s": round(result.wall_time, 2),
        "checkpoint": str(result.checkpoints[-1]) if result.checkpoints else None,
    }
    if args.eval_samples > 0 and hasattr(result.model, "sample"):
        from trajflow.data import sample_dataset

        # Sample quality in data units, from the EMA weights when there are some; the same
        # numbers as `trajflow eval --n <eval-samples>` on the last checkpoint.
        sampler = (result.ema if result.ema is not None else result.model).eval()
        samples = _sample_points(sampler, args.eval_samples, None, config.seed)
        data = sample_dataset(config.dataset, args.eval_samples, seed=10_000 + config.seed)
        bad = int((~samples.isfinite()).flatten(1).any(1).sum())
        report["non_finite_samples"] = bad
        report["sliced_wasserstein"] = (
            None if bad else sliced_wasserstein(samples, data, generator=_generator(0))
        )
    _write_json(out / "train_report.json", report, "the run report")
    print(json.dumps(report, indent=2))


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- sample
def _write_samples(path: Path, samples, title: str) -> None:
    import numpy as np
    import torch

    with _atomic_output(path, "--out") as temporary:
        if path.suffix.lower() == ".png":
            from trajflow.plotting import scatter_grid

            scatter_grid({title: samples}, temporary, columns=1, limit=4.0)
        elif path.suffix.lower() == ".npy":
            with open(temporary, "wb") as file:  # a path not ending in .npy would get one added
                np.save(file, samples.numpy())
        else:
            torch.save(samples, temporary)


def _check_sample_output(out: Path) -> None:
    if out.suffix.lower() not in SAMPLE_FORMATS:
        raise ConfigError(
            f"--out {out}: expected a file ending in {', '.join(SAMPLE_FORMATS)} (a scatter plot "
            f"or the points), got {out.suffix or 'no suffix'!r}"
        )
    _check_writable(out, "--out")


def _sample(args: argparse.Namespace) -> None:
    out = Path(args.out)
    _check_sample_output(out)
    model, _, facts = _load_for_sampling(args)
    if out.suffix.lower() == ".png" and tuple(model.event_shape) != (2,):
        raise ConfigError(
            f"--out {out}: a .png scatter plot needs 2-D points, but this model's samples have "
            f"shape {tuple(model.event_shape)}; write .npy or .pt instead"
        )
    steps = args.steps or _default_steps(model)
    samples = _sample_points(model, args.n, steps, args.seed)
    bad = int((~samples.isfinite()).flatten(1).any(1).sum())
    title = f"{facts['model']}, {steps} steps ({facts['weights']} weights)"
    _write_samples(out, samples, title)
    report = {**facts, "n": args.n, "steps": steps, "seed": args.seed, "out": str(out)}
    report["non_finite_samples"] = bad
    print(json.dumps(report, indent=2))
    if bad:
        print(f"trajflow sample: warning: {bad} of {args.n} samples are NaN/inf", file=sys.stderr)


# ----------------------------------------------------------------------------- eval
def _eval(args: argparse.Namespace) -> None:
    from trajflow.data import sample_dataset
    from trajflow.metrics import sliced_wasserstein

    out = None if args.out is None else Path(args.out)
    if out is not None:
        if out.suffix.lower() != ".json":
            raise ConfigError(f"--out {out}: expected a file ending in .json")
        _check_writable(out, "--out")
    model, state, facts = _load_for_sampling(args)
    train_config = state.train_config or {}
    dataset = args.dataset or train_config.get("dataset")
    if dataset is None:
        raise ConfigError(f"{facts['checkpoint']} records no training dataset; pass --dataset")
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS.names())}")
    if tuple(model.event_shape) != (2,):
        raise ConfigError(
            f"eval compares with a toy dataset of 2-D points, but this model's samples have "
            f"shape {tuple(model.event_shape)}"
        )
    train_seed = int(train_config.get("seed", 0))
    seed = train_seed if args.seed is None else args.seed
    steps = args.steps or _default_steps(model)
    # Held out: training batches are drawn with seeds hashed from (seed, step).
    data = sample_dataset(dataset, args.n, seed=10_000 + train_seed)
    samples = _sample_points(model, args.n, steps, seed)
    bad = int((~samples.isfinite()).flatten(1).any(1).sum())
    report: dict[str, Any] = {**facts, "step": state.step, "dataset": dataset, "n": args.n}
    report.update({"steps": steps, "seed": seed, "non_finite_samples": bad})
    report["sliced_wasserstein"] = (
        None
        if bad
        else sliced_wasserstein(
            samples, data, projections=args.projections, generator=_generator(0)
        )
    )
    if callable(getattr(model, "data_bound", None)):
        parameter = next(model.parameters())
        bound = model.data_bound(
            data.to(parameter.device, parameter.dtype), steps=steps, generator=_generator(seed + 1)
        )
        report["bits_per_dim_bound"] = _finite_or_none(bound.bits_per_dim.mean().item())
        report["bound_variable"] = bound.variable
    else:
        report["bits_per_dim_bound"] = None
        report["bound_variable"] = (
            f"none: {facts['model']} has no likelihood bound in trajflow; only the sliced "
            "Wasserstein distance is reported"
        )
    if out is not None:
        _write_json(out, report, "--out")
    print(json.dumps(report, indent=2))


# ----------------------------------------------------------------------------- parser
def _sampling_arguments(parser: argparse.ArgumentParser, n: int) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, or a run folder to take the newest step_* from",
    )
    parser.add_argument("--n", type=_positive_int, default=n, help=f"samples (default {n})")
    parser.add_argument(
        "--steps",
        type=_positive_int,
        help="sampling steps (default: the model's own, 4 for an NTM, 100 Euler steps for FM)",
    )
    parser.add_argument(
        "--weights",
        choices=["auto", "ema", "model"],
        default="auto",
        help="EMA or live weights (default auto: EMA when the checkpoint has them)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trajflow", description=__doc__.split("\n")[0])
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
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    train.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints")
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

    sample = commands.add_parser(
        "sample",
        help="draw samples from a checkpoint into a .png scatter plot or .npy / .pt points",
        description="Draw samples from a checkpoint (EMA weights when it has them).",
    )
    _sampling_arguments(sample, n=2000)
    sample.add_argument(
        "--out", required=True, help="output file: .png (scatter plot), .npy or .pt (points)"
    )
    sample.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    sample.set_defaults(run=_sample)

    evaluate = commands.add_parser(
        "eval",
        help="bits/dim bound and sliced Wasserstein distance on held-out data, as JSON",
        description=(
            "Evaluate a checkpoint on held-out data of its training dataset: the NTM's "
            "bits/dim bound and the sliced Wasserstein distance between samples and data."
        ),
    )
    _sampling_arguments(evaluate, n=2000)
    evaluate.add_argument("--dataset", help="toy dataset (default: the checkpoint's)")
    evaluate.add_argument(
        "--seed", type=int, help="seeds the sampling noise (default: the training seed)"
    )
    evaluate.add_argument(
        "--projections", type=_positive_int, default=256, help="sliced Wasserstein directions"
    )
    evaluate.add_argument("--out", help="also write the JSON report to this .json file")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trajflow`` command.

    Mistakes in files, flags or checkpoints print a message naming what was expected and exit
    with status 2 (argparse does the same for malformed flags).
    """
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ConfigError as error:
        print(f"trajflow {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
