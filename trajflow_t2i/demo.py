"""``make demo``: the shipped text-to-image NTM in action, then a short training run.

1. Samples a grid for a handful of prompts from the checkpoint shipped in the package
   (4 steps, guidance 3): seconds on 2 CPU cores.
2. Scores prompt following with the rule-based check (:mod:`trajflow_t2i.check`) on fresh
   test prompts and on the held-out attribute combinations, beside the chance level.
3. Bounds the shipped model's bits/dim on test images (the variable is stated).
4. Trains the ``tiny`` preset briefly (both stages) to show that training works.

Everything lands in ``out_dir``: ``samples.png``, ``report.json`` and the tiny run.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as out:  # doctest: +SKIP
    ...     report = run_demo(out, check_images_per_split=16, tiny_steps=2)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from trajflow_t2i.check import accuracy, chance_accuracy, check_images
from trajflow_t2i.data import make_split
from trajflow_t2i.pipeline import Pipeline, image_grid, save_png
from trajflow_t2i.presets import preset
from trajflow_t2i.training import train_t2i

__all__ = ["DEMO_PROMPTS", "prompt_following", "run_demo"]

#: The prompts of the demo grid: colour, count and position, two of them held out in training.
DEMO_PROMPTS = (
    "a red circle left of a blue square",
    "two green triangles",
    "three yellow circles",
    "a blue square above a white circle",
    "a purple triangle",  # a held-out colour-shape pair
    "an orange square right of a green circle",
)


def prompt_following(
    pipeline: Pipeline,
    split: str,
    n: int,
    steps: int = 4,
    cfg: float = 3.0,
    seed: int = 0,
    batch: int = 64,
) -> dict:
    """Per-kind prompt-following rates of ``pipeline`` on ``n`` captions of a ``shapes`` split.

    One image per caption; the chance level judges each image against another caption of
    the same kind (what a model that ignores the prompt would score).
    """
    data = make_split(
        "shapes", split, n=n, seed=seed + 1, size=pipeline.model.config.data.image_size
    )
    images = torch.cat(
        [
            pipeline(data.captions[i : i + batch], n=1, steps=steps, cfg=cfg, seed=seed + i)[:, 0]
            for i in range(0, n, batch)
        ]
    )
    kinds = [scene.kind for scene in data.scenes]
    results = check_images(images, data.captions)
    return {
        "split": split,
        "images": n,
        "steps": steps,
        "cfg": cfg,
        "accuracy": accuracy(results, kinds),
        "chance": chance_accuracy(
            images, data.captions, kinds, torch.Generator().manual_seed(seed)
        ),
    }


def run_demo(
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    check_images_per_split: int = 256,
    tiny_steps: int = 60,
    seed: int = 0,
) -> dict:
    """Runs the four parts of the demo and writes ``samples.png`` and ``report.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    pipeline = Pipeline.from_pretrained(checkpoint)
    began = time.perf_counter()
    images = pipeline(list(DEMO_PROMPTS), n=8, steps=4, cfg=3.0, seed=seed)
    report["grid"] = {
        "file": str(save_png(image_grid(images), out / "samples.png")),
        "prompts": list(DEMO_PROMPTS),
        "images_per_prompt": 8,
        "steps": 4,
        "cfg": 3.0,
        "seconds": round(time.perf_counter() - began, 2),
    }
    report["prompt_following"] = [
        prompt_following(pipeline, split, check_images_per_split, seed=seed)
        for split in ("test", "heldout")
    ]

    test = make_split(
        "shapes", "test", n=64, seed=seed + 2, size=pipeline.model.config.data.image_size
    )
    bound = pipeline.model.bits_per_dim(
        test.images, test.captions, steps=4, generator=torch.Generator().manual_seed(seed)
    )
    report["bits_per_dim"] = {
        "value": round(float(bound.bits_per_dim.mean()), 4),
        "variable": bound.variable,
        "images": 64,
    }

    config = preset("tiny")
    config.train.fm.iterations = config.train.ntm.iterations = tiny_steps
    config.train.checkpoint_every = tiny_steps
    began = time.perf_counter()
    train_t2i(config, out / "tiny_run", resume=(out / "tiny_run").exists())
    report["tiny_training"] = {
        "preset": "tiny",
        "steps_per_stage": tiny_steps,
        "seconds": round(time.perf_counter() - began, 2),
        "exported": str(out / "tiny_run" / "final"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict) -> str:
    """A few plain lines for the terminal."""
    lines = [
        f"grid of {len(report['grid']['prompts'])} prompts × 8 images in "
        f"{report['grid']['seconds']} s: {report['grid']['file']}"
    ]
    for part in report["prompt_following"]:
        all_ = part["accuracy"]["all"]
        chance = part["chance"]["all"]
        lines.append(
            f"prompt following on {part['images']} {part['split']} prompts: "
            f"ok {all_['ok']:.2f} (chance {chance['ok']:.2f}), colour {all_['colour']:.2f}, "
            f"count {all_['count']:.2f}, position {all_.get('position', float('nan')):.2f}"
        )
    bpd = report["bits_per_dim"]
    lines.append(f"bits/dim {bpd['value']} on {bpd['images']} test images ({bpd['variable']})")
    tiny = report["tiny_training"]
    lines.append(
        f"tiny preset trained {tiny['steps_per_stage']} steps per stage in "
        f"{tiny['seconds']} s: {tiny['exported']}"
    )
    return "\n".join(lines)
