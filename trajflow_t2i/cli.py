"""Command line: ``trajflow-t2i train | train-denoiser | sample | info | demo``.

    trajflow-t2i sample "a red circle left of a blue square" --out x.png [--denoiser learned]
    trajflow-t2i train --preset small --out runs/small
    trajflow-t2i train-denoiser --checkpoint runs/small/final --out runs/small/final/denoiser
    trajflow-t2i info [--checkpoint DIR]
    trajflow-t2i demo --out out/demo

Errors in prompts, configs or checkpoints print one clear message and exit with status 2;
no partial output file is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _config(args: argparse.Namespace):
    from pydantic import ValidationError

    from trajflow_t2i.presets import T2IConfig, preset

    if args.config:
        path = Path(args.config)
        try:
            return T2IConfig.model_validate_json(path.read_text())
        except OSError as error:
            raise CLIError(f"cannot read the config {path}: {error.strerror or error}") from None
        except ValidationError as error:
            raise CLIError(f"invalid config {path}: {error}") from None
    try:
        return preset(args.preset)
    except ValueError as error:
        raise CLIError(str(error)) from None


def _train(args: argparse.Namespace) -> None:
    from trajflow_t2i.training import train_t2i

    config = _config(args)
    out = Path(args.out or f"runs/{config.name}")
    try:
        train_t2i(config, out, resume=args.resume, device=args.device)
    except (FileExistsError, ValueError) as error:
        raise CLIError(str(error)) from None
    print(f"trained {config.name}: exported to {out / 'final'}")


def _load(checkpoint: str | None):
    from trajflow_t2i.weights import load_model

    try:
        return load_model(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        where = "the shipped default checkpoint" if checkpoint is None else checkpoint
        raise CLIError(f"cannot load {where}: {error}") from None


def _sample(args: argparse.Namespace) -> None:
    from trajflow_t2i.pipeline import Pipeline, image_grid, save_png

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must name a .png file, got {out}")
    if not out.parent.is_dir():
        raise CLIError(f"the folder of --out {out} does not exist")
    if args.n < 1 or args.steps < 1:
        raise CLIError(f"--n and --steps must be positive, got {args.n} and {args.steps}")
    if not args.cfg >= 0:
        raise CLIError(f"--cfg must be a weight >= 0, got {args.cfg}")
    if args.denoiser_checkpoint and args.denoiser != "learned":
        raise CLIError("--denoiser-checkpoint needs --denoiser learned")
    model = _load(args.checkpoint)
    if args.denoiser != "none" and model.stage != "ntm":
        raise CLIError(f"--denoiser {args.denoiser} needs an NTM-stage checkpoint")
    pipeline = Pipeline(model, _load_denoiser(args, model))
    try:
        images = pipeline(
            args.prompts,
            n=args.n,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            denoiser=args.denoiser,
        )
    except ValueError as error:  # unknown words, empty or over-long prompts
        raise CLIError(f"bad prompt: {error}") from None
    save_png(image_grid(images), out)
    print(
        f"wrote {out}: {len(args.prompts)} prompt(s) × {args.n} image(s), {args.steps} steps, "
        f"denoiser {args.denoiser}"
    )


def _load_denoiser(args: argparse.Namespace, model):
    """The learned denoiser for ``--denoiser learned``: ``--denoiser-checkpoint``, else the
    ``denoiser/`` folder of the model's checkpoint."""
    from trajflow.checkpoint import CheckpointError
    from trajflow_t2i.denoiser import DENOISER_DIR, load_t2i_denoiser
    from trajflow_t2i.weights import DEFAULT_WEIGHTS

    if args.denoiser != "learned":
        return None
    folder = args.denoiser_checkpoint or Path(args.checkpoint or DEFAULT_WEIGHTS) / DENOISER_DIR
    if not Path(folder).is_dir():
        raise CLIError(
            f"no learned denoiser in {folder}: train one with `trajflow-t2i train-denoiser` "
            "or name it with --denoiser-checkpoint"
        )
    try:
        return load_t2i_denoiser(folder, model)
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        raise CLIError(f"cannot load the denoiser {folder}: {error}") from None


def _is_denoiser(folder: Path) -> bool:
    """Whether ``folder`` holds a denoiser checkpoint (which training may replace)."""
    from trajflow.checkpoint import read_checkpoint_config

    try:
        return "denoiser" in read_checkpoint_config(folder).get("extra", {})
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return False


def _train_denoiser(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from trajflow_t2i.denoiser import DenoiserTrainConfig, train_denoiser

    try:
        config = DenoiserTrainConfig(
            steps=args.steps,
            pairs=args.pairs,
            holdout=args.holdout,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except ValidationError as error:
        raise CLIError(f"invalid denoiser settings: {error}") from None
    out = Path(args.out)
    if out.exists() and not _is_denoiser(out):  # never replace a model or other folder
        raise CLIError(f"--out {out} exists and is not a denoiser checkpoint: name a new folder")
    model = _load(args.checkpoint)
    if model.stage != "ntm":
        raise CLIError("train-denoiser needs an NTM-stage checkpoint")
    result = train_denoiser(model, config, out=out)
    metrics = ", ".join(f"{key} {value:.3e}" for key, value in result.metrics.items())
    print(f"trained the denoiser ({config.steps} steps): {metrics}; wrote {out}")


def _info(args: argparse.Namespace) -> None:
    import torch

    from trajflow_t2i.model import TextToImage
    from trajflow_t2i.presets import PRESETS, preset
    from trajflow_t2i.weights import DEFAULT_WEIGHTS, read_config

    if args.checkpoint or not args.presets:
        folder = args.checkpoint or DEFAULT_WEIGHTS
        try:
            meta = read_config(folder)
        except (FileNotFoundError, ValueError) as error:
            raise CLIError(f"cannot read {folder}: {error}") from None
        meta["config"] = meta["config"].model_dump(mode="json")
        print(json.dumps({"checkpoint": str(folder), **meta}, indent=2))
        if args.checkpoint:
            return
    rows = []
    for name in PRESETS:
        config = preset(name)
        with torch.device("meta"):  # the paper's size builds without allocating memory
            counts = TextToImage(config, stage="ntm").parameter_count()
        rows.append((name, config.data.name, config.data.image_size, counts))
    print(
        f"{'preset':<7} {'data':<7} {'size':>4} {'transporter':>12} {'predictor':>12} "
        f"{'text':>10} {'total':>14}"
    )
    for name, data, size, counts in rows:
        print(
            f"{name:<7} {data:<7} {size:>4} {counts['transporter']:>12,} "
            f"{counts['predictor']:>12,} {counts['text_encoder']:>10,} {counts['total']:>14,}"
        )


def _demo(args: argparse.Namespace) -> None:
    from trajflow_t2i.demo import run_demo, summary

    if args.images < 1 or args.tiny_steps < 1:
        raise CLIError(
            f"--images and --tiny-steps must be positive, got {args.images}, {args.tiny_steps}"
        )
    report = run_demo(args.out, args.checkpoint, args.images, args.tiny_steps)
    print(summary(report))
    print(f"wrote {Path(args.out) / 'samples.png'} and {Path(args.out) / 'report.json'}")


def _eval(args: argparse.Namespace) -> None:
    from trajflow_t2i.evaluate import run_eval, summary, write_json
    from trajflow_t2i.verifier import verifier_for
    from trajflow_t2i.weights import DEFAULT_WEIGHTS

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".json":
        raise CLIError(f"--out must name a .json file, got {out}")
    if out is not None and not out.parent.is_dir():
        raise CLIError(f"the folder of --out {out} does not exist")
    if args.n < 1 or args.steps < 1 or args.bpd_images < 0:
        raise CLIError(
            f"--n and --steps must be positive and --bpd-images >= 0, got {args.n}, "
            f"{args.steps} and {args.bpd_images}"
        )
    if not args.cfg >= 0:
        raise CLIError(f"--cfg must be a weight >= 0, got {args.cfg}")
    if args.verifier and Path(args.verifier).exists() and not Path(args.verifier).is_dir():
        raise CLIError(f"--verifier must name a folder, got the file {args.verifier}")
    model = _load(args.checkpoint)
    data = model.config.data
    try:
        # A cached verifier is loaded; otherwise one is trained now (deterministic, seconds)
        # and, with --verifier, saved there for the next run.
        verifier, verifier_report = verifier_for(data.name, data.image_size, cache=args.verifier)
        report = run_eval(
            model,
            n=args.n,
            steps=args.steps,
            cfg=args.cfg,
            seed=args.seed,
            verifier=verifier,
            verifier_report=verifier_report,
            bpd_images=args.bpd_images,
        )
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(str(error)) from None
    report = {"checkpoint": str(args.checkpoint or DEFAULT_WEIGHTS), **report}
    if out is None:
        print(json.dumps(report, indent=2))
        return
    write_json(report, out)
    print(summary(report))
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``trajflow-t2i``."""
    parser = argparse.ArgumentParser(
        prog="trajflow-t2i", description="Text-to-image Normalizing Trajectory Models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="FM pretraining, then NTM finetuning")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="tiny, small, base or paper")
    source.add_argument("--config", help="a T2IConfig JSON file")
    train.add_argument("--out", help="run folder (default runs/<preset>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    train.set_defaults(run=_train)

    sample = commands.add_parser("sample", help="an image grid for one or more prompts")
    sample.add_argument("prompts", nargs="+", help="one or more prompts (one grid row each)")
    sample.add_argument("--steps", type=int, default=4, help="Gaussian steps T (default 4)")
    sample.add_argument("--cfg", type=float, default=3.0, help="guidance weight w >= 0")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--n", type=int, default=8, help="images per prompt")
    sample.add_argument("--checkpoint", help="exported model folder (default: shipped)")
    sample.add_argument("--out", required=True, help="output .png")
    sample.add_argument(
        "--denoiser",
        choices=["none", "score", "learned"],
        default="none",
        help="denoise the end of the chain: none, score (trajectory score) or learned",
    )
    sample.add_argument(
        "--denoiser-checkpoint", help="learned denoiser folder (default: <checkpoint>/denoiser)"
    )
    sample.set_defaults(run=_sample)

    denoise = commands.add_parser(
        "train-denoiser", help="train the learned denoiser of a frozen NTM checkpoint"
    )
    denoise.add_argument("--checkpoint", help="exported model folder (default: shipped)")
    denoise.add_argument("--out", required=True, help="denoiser folder to write")
    denoise.add_argument("--steps", type=int, default=1000, help="optimisation steps")
    denoise.add_argument("--pairs", type=int, default=4096, help="score-denoised target pairs")
    denoise.add_argument("--holdout", type=int, default=256, help="held-out pairs for the report")
    denoise.add_argument("--batch-size", type=int, default=64)
    denoise.add_argument("--seed", type=int, default=0)
    denoise.set_defaults(run=_train_denoiser)

    info = commands.add_parser("info", help="presets and their sizes; a checkpoint's config")
    info.add_argument("--checkpoint", help="exported model folder")
    info.add_argument("--presets", action="store_true", help="only the presets table")
    info.set_defaults(run=_info)

    demo = commands.add_parser("demo", help="sample, check, bound and train briefly (make demo)")
    demo.add_argument("--out", default="out/demo", help="output folder")
    demo.add_argument("--checkpoint", help="exported model folder (default: shipped)")
    demo.add_argument("--images", type=int, default=256, help="prompts checked per split")
    demo.add_argument("--tiny-steps", type=int, default=60, help="steps per stage of the tiny run")
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser(
        "eval", help="compositional accuracy, Fréchet distance and bits/dim as JSON"
    )
    evaluate.add_argument("--checkpoint", help="exported model folder (default: shipped)")
    evaluate.add_argument("--out", help="output .json (default: print the JSON)")
    evaluate.add_argument("--n", type=int, default=256, help="prompts per split")
    evaluate.add_argument("--steps", type=int, default=4, help="sampling steps T (default 4)")
    evaluate.add_argument("--cfg", type=float, default=3.0, help="guidance weight w >= 0")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--verifier", help="verifier folder: loaded if there, else trained and saved there"
    )
    evaluate.add_argument(
        "--bpd-images", type=int, default=128, help="test images of bits/dim (0: skip)"
    )
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the CLI; exits with status 2 and a one-line message on user errors."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CLIError as error:
        print(f"trajflow-t2i {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
