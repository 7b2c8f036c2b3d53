"""Figures and numbers of the text-to-image page, from the shipped model and its FM stage.

Needs the run folder of the shipped model (``trajflow-t2i train --preset small --out
runs/small``) for the flow-matching stage it was finetuned from. Writes
``docs/assets/t2i_samples.png``, ``docs/assets/t2i_fm_vs_ntm.png`` and
``benchmarks/results/t2i_shipped.json``.

    python docs/scripts/t2i_figures.py --run runs/small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import fingerprint  # noqa: E402

from trajflow.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from trajflow_t2i.demo import DEMO_PROMPTS, prompt_following  # noqa: E402
from trajflow_t2i.model import TextToImage  # noqa: E402
from trajflow_t2i.pipeline import Pipeline, image_grid, save_png  # noqa: E402
from trajflow_t2i.weights import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/small", help="run folder of the shipped model")
    parser.add_argument("--images", type=int, default=256, help="prompts per split")
    args = parser.parse_args()
    torch.set_num_threads(1)

    ntm = Pipeline(load_model())
    fm_model = TextToImage(ntm.model.config, stage="fm")
    _, state = load_checkpoint(latest_checkpoint(Path(args.run) / "fm"), model=fm_model)
    fm_model.load_state_dict(state.ema)  # the weights the NTM stage started from
    fm = Pipeline(fm_model)

    prompts = list(DEMO_PROMPTS)
    save_png(
        image_grid(ntm(prompts, n=8, steps=4, cfg=3.0, seed=0)),
        ROOT / "docs/assets/t2i_samples.png",
    )
    columns = [
        fm(prompts, n=3, steps=4, cfg=3.0, seed=0),
        fm(prompts, n=3, steps=50, cfg=3.0, seed=0),
        ntm(prompts, n=3, steps=4, cfg=3.0, seed=0),
    ]
    save_png(image_grid(torch.cat(columns, dim=1)), ROOT / "docs/assets/t2i_fm_vs_ntm.png")

    rows = []
    for name, pipeline, steps in [
        ("NTM", ntm, 4),
        ("NTM", ntm, 8),
        ("FM Euler", fm, 4),
        ("FM Euler", fm, 50),
    ]:
        for split in ("test", "heldout"):
            began = time.perf_counter()
            report = prompt_following(pipeline, split, args.images, steps=steps, cfg=3.0)
            seconds = time.perf_counter() - began
            rows.append(
                {
                    "model": name,
                    "steps": steps,
                    "split": split,
                    "seconds_per_image": seconds / args.images,
                    **report,
                }
            )
            all_ = report["accuracy"]["all"]
            print(
                f"{name:9} {steps:3} {split:8} ok {all_['ok']:.3f} colour {all_['colour']:.3f} "
                f"count {all_['count']:.3f} position {all_.get('position', float('nan')):.3f} "
                f"(chance ok {report['chance']['all']['ok']:.3f}) {seconds / args.images:.3f} s/img"
            )
    out = ROOT / "benchmarks/results/t2i_shipped.json"
    out.write_text(json.dumps({"fingerprint": fingerprint(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
