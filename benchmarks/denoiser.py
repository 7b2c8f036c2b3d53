"""Learned vs score denoising of a text-to-image NTM: time per image and distance.

Three ways to finish an NTM sample (all draw the same Gaussian chain in u-space):

* ``none``: one transporter inverse of ``u_{t_0}`` (today's default);
* ``score``: invert the transporter at every level and take a trajectory-score
  (Tweedie) step, with a backward pass through the model (method notes §7);
* ``learned``: a small transformer ``g_φ(u_{t_0}, y) → x̂_0``, trained against the frozen
  model's score-denoised targets of real images: no inverse, no backward pass.

Reports the median time per image of each path end to end (chain included, as images/s
are counted) and of the denoising step alone (chain excluded), the learned output's distance
to the score-denoised output on the same chains (per-pixel RMSE in ``[-1, 1]`` units and
PSNR with peak-to-peak 2), and for scale the distances of ``none`` and of the identity
(``x̂_0 = u_{t_0}``, the untrained denoiser) to the same reference. Target (issue 8): the
learned path ≥ 5× faster per image than the score path. Each ``--cfg`` weight is measured
separately: guidance doubles the cost of the chain, which every path shares.

    python benchmarks/denoiser.py --checkpoint runs/small/final --denoiser-steps 800 \\
        --cfg 3 0 --out benchmarks/results/denoiser_cpu.json

Without ``--checkpoint`` an untrained model of ``--preset`` is built (smoke runs only).
``--t0`` ends the chains at another level than the model's ``t_min_eval`` (and trains the
denoiser there): the noisier ``t_0``, the more work the denoising step does. The end-to-end
timings run ``TextToImage.generate``, which always ends at ``t_min_eval``; the cost of every
path does not depend on ``t_0``.
Writes the JSON, a markdown table, a timing chart (``.png``) and a grid of samples
(``_samples.png``: rows none / score / learned), both for the first ``--cfg``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Target,
    fingerprint,
    markdown_table,
    pyplot,
    resolve_devices,
    timeit_interleaved,
    write_json,
)

from trajflow.denoise import sample_u_trajectory, trajectory_score_denoise
from trajflow_t2i.data import make_split
from trajflow_t2i.denoiser import (
    DenoiserTrainConfig,
    load_t2i_denoiser,
    model_fingerprint,
    train_denoiser,
)
from trajflow_t2i.model import TextToImage
from trajflow_t2i.pipeline import image_grid, save_png, to_uint8
from trajflow_t2i.presets import preset
from trajflow_t2i.weights import load_model

PATHS = ("none", "score", "learned")


def _model(args: argparse.Namespace, device: torch.device) -> tuple[TextToImage, dict[str, Any]]:
    if args.checkpoint:
        model = load_model(args.checkpoint, device=device)
        source = {"checkpoint": str(args.checkpoint), "trained": True}
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = TextToImage(preset(args.preset), stage="ntm").to(device).eval()
        source = {"preset": args.preset, "trained": False}
    if model.stage != "ntm":
        raise SystemExit(f"{args.checkpoint}: the denoisers need an NTM-stage checkpoint")
    source.update(
        name=model.config.name,
        parameters=model.parameter_count(),
        fingerprint=model_fingerprint(model),
        tokens=model.config.model.tokens(model.config.data),
        token_features=model.config.model.token_features(model.config.data),
    )
    return model, source


def _denoiser(args: argparse.Namespace, model: TextToImage) -> tuple[Any, dict[str, Any]]:
    if args.denoiser:  # trained against this model (its fingerprint is checked)
        denoiser = load_t2i_denoiser(args.denoiser, model)
        info: dict[str, Any] = {"checkpoint": str(args.denoiser)}
    else:
        config = DenoiserTrainConfig(
            steps=args.denoiser_steps,
            pairs=args.pairs,
            holdout=args.holdout,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            sampling_steps=[args.steps],
            t0=args.t0,
        )
        start = time.perf_counter()
        result = train_denoiser(model, config, out=args.save_denoiser, progress=args.progress)
        denoiser = result.denoiser
        info = {
            "trained_here": config.model_dump(mode="json"),
            "train_seconds": time.perf_counter() - start,
            "metrics": result.metrics,
        }
        if args.save_denoiser:
            info["checkpoint"] = str(args.save_denoiser)
    info["parameters"] = sum(p.numel() for p in denoiser.parameters())
    info["spec"] = denoiser.spec.model_dump(mode="json")
    return denoiser, info


def _prompts(model: TextToImage, n: int, offset: int = 0) -> list[str]:
    """Captions of the held-out test split (never trained on)."""
    data = model.config.data
    split = make_split(data.name, "test", n=offset + n, seed=data.seed, size=data.image_size)
    return split.captions[offset:]


class _Chains:
    """The u-chains of one batch and the three (plus identity) finishes of them."""

    def __init__(self, model: TextToImage, denoiser, prompts: list[str], args, cfg, seed: int):
        self.model, self.denoiser, self.args, self.cfg = model, denoiser, args, cfg
        self.tokens, self.mask, _ = model.encode_text(prompts)
        self.seed = seed

    def chain(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        args = self.args
        return sample_u_trajectory(self.model.generator, len(self.tokens), args.steps, self.cfg,
                                   self.tokens, self.mask, generator=generator,
                                   t_min=args.t0)  # fmt: skip

    @torch.no_grad()
    def finish(self, path: str, u: Tensor, times: Tensor) -> Tensor:
        ntm = self.model.generator
        if path == "none":
            return ntm.untransport(u[:, 0], times[:, 0], self.args.steps)
        if path == "score":
            return trajectory_score_denoise(ntm, u, times, self.tokens, self.mask)
        if path == "learned":
            return self.denoiser(u[:, 0], self.tokens, self.mask)
        return u[:, 0]  # identity: the untrained denoiser's output


def _timings(model, denoiser, args, cfg: float) -> list[dict]:
    """End-to-end and denoising-step-only seconds per image of each path."""
    prompts = _prompts(model, args.images)
    chains = _Chains(model, denoiser, prompts, args, cfg, args.seed)
    n = len(prompts)

    def generate(path: str):
        generator = torch.Generator().manual_seed(args.seed)
        kwargs = {"learned_denoiser": denoiser} if path == "learned" else {}
        return lambda: model.generate(prompts, args.steps, cfg, generator, denoiser=path,
                                      **kwargs)  # fmt: skip

    ends = timeit_interleaved([generate(p) for p in PATHS], args.warmup, args.repeats)
    u, times = chains.chain()
    steps = timeit_interleaved(
        [chains.chain] + [lambda p=p: chains.finish(p, u, times) for p in PATHS],
        args.warmup,
        args.repeats,
    )
    chain_seconds, steps = steps[0], dict(zip(PATHS, steps[1:], strict=True))
    score_end = dict(zip(PATHS, ends, strict=True))["score"]
    records = [
        {
            "cfg": cfg,
            "path": path,
            "ms_per_image": 1e3 * seconds / n,
            "images_per_s": n / seconds,
            "speedup_vs_score": score_end / seconds,
            "chain_ms_per_image": 1e3 * chain_seconds / n,
            "denoise_step_ms_per_image": 1e3 * steps[path] / n,
            "step_speedup_vs_score": steps["score"] / steps[path],
        }
        for path, seconds in zip(PATHS, ends, strict=True)
    ]
    return records


def _distances(model, denoiser, args, cfg: float) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Per-pixel distances to the score-denoised images on the same chains."""
    squares: dict[str, float] = {"none": 0.0, "learned": 0.0, "identity": 0.0}
    count, first = 0, None
    for start in range(0, args.eval_images, args.images):
        prompts = _prompts(model, min(args.images, args.eval_images - start), offset=start)
        chains = _Chains(model, denoiser, prompts, args, cfg, args.seed + 1 + start)
        u, times = chains.chain()
        images = {
            path: model.to_images(chains.finish(path, u, times))
            for path in ("score", "none", "learned", "identity")
        }
        for path in squares:
            squares[path] += (images[path] - images["score"]).square().sum().item()
        count += images["score"].numel()
        first = images if first is None else first
    result: dict[str, Any] = {"cfg": cfg, "images": args.eval_images, "reference": "score"}
    for path, total in squares.items():
        rmse = math.sqrt(total / count)
        result[path] = {"rmse": rmse, "psnr_db": 20 * math.log10(2 / rmse) if rmse else math.inf}
    return result, first


def _plots(records, samples, out: Path, n_columns: int, cfg: float) -> None:
    grid = torch.stack([to_uint8(samples[path][:n_columns]) for path in PATHS])
    save_png(image_grid(grid.cpu()), out.with_name(out.stem + "_samples.png"))
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(5, 3))
    chain = [r["chain_ms_per_image"] for r in records]
    step = [r["denoise_step_ms_per_image"] for r in records]
    axis.barh(PATHS, chain, label="Gaussian chain")
    axis.barh(PATHS, step, left=chain, label="denoising step")
    axis.set(xlabel="ms per image", title=f"finishing an NTM sample (cfg {cfg:g})")
    axis.invert_yaxis()
    axis.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--checkpoint", help="exported NTM folder (default: untrained --preset)")
    parser.add_argument("--preset", default="tiny", help="untrained model without --checkpoint")
    parser.add_argument("--denoiser", help="a trained denoiser folder (else: train one here)")
    parser.add_argument("--denoiser-steps", type=int, default=800)
    parser.add_argument("--pairs", type=int, default=4096, help="score-denoised training pairs")
    parser.add_argument("--holdout", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="denoiser training batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-denoiser", help="folder to save the denoiser trained here")
    parser.add_argument("--images", type=int, default=32, help="images per timed batch")
    parser.add_argument("--eval-images", type=int, default=256, help="images for distances")
    parser.add_argument("--steps", type=int, default=4, help="Gaussian steps T")
    parser.add_argument("--cfg", type=float, nargs="+", default=[3.0],
                        help="guidance weights (3: the pipeline's default)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--t0", type=float, help="where chains end (default: t_min_eval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--progress", action="store_true", help="show training progress")
    args = parser.parse_args(argv)
    for name in ("denoiser_steps", "pairs", "holdout", "images", "eval_images", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.t0 is not None and not 0 < args.t0 < 1:
        parser.error(f"--t0 must lie in (0, 1), got {args.t0}")
    if not all(math.isfinite(w) and w >= 0 for w in args.cfg):
        parser.error(f"--cfg weights must be finite and >= 0, got {args.cfg}")
    (device,) = resolve_devices(args.device)

    model, model_info = _model(args, device)
    model_info["t_min_eval"] = model.generator.schedule.t_min_eval
    denoiser, denoiser_info = _denoiser(args, model)
    records, distances, targets, samples = [], [], [], None
    for cfg in args.cfg:
        rows = _timings(model, denoiser, args, cfg)
        measured, images = _distances(model, denoiser, args, cfg)
        records += rows
        distances.append(measured)
        samples = images if samples is None else samples  # the first cfg's samples
        learned = next(r for r in rows if r["path"] == "learned")
        name = f"learned / score speed per image, end to end (cfg {cfg:g})"
        targets.append(Target(name, learned["speedup_vs_score"], 5.0, at_most=False))
    payload = {
        "fingerprint": fingerprint([device]),
        "settings": vars(args),
        "model": model_info,
        "denoiser": denoiser_info,
        "records": records,
        "distances": distances,
        "targets": [target.as_dict() for target in targets],
    }
    out = Path(args.out)
    write_json(out, payload)
    columns = ["cfg", "path", "ms_per_image", "images_per_s", "speedup_vs_score",
               "denoise_step_ms_per_image", "step_speedup_vs_score"]  # fmt: skip
    print(markdown_table(records, columns))
    rows = [
        {"cfg": measured["cfg"], "vs score": path, **measured[path]}
        for measured in distances
        for path in ("learned", "none", "identity")
    ]
    print(markdown_table(rows, ["cfg", "vs score", "rmse", "psnr_db"]))
    for target in targets:
        print(target.line())
    first = [r for r in records if r["cfg"] == args.cfg[0]]
    _plots(first, samples, out, min(8, args.images), args.cfg[0])
    return payload


if __name__ == "__main__":
    main()
