"""The checkpoint shipped in the package loads offline, samples in seconds, follows prompts."""

from __future__ import annotations

import torch

from trajflow_t2i import Pipeline
from trajflow_t2i.demo import prompt_following
from trajflow_t2i.weights import DEFAULT_WEIGHTS, read_config


def test_the_shipped_checkpoint_is_small_and_documented():
    weights = DEFAULT_WEIGHTS / "model.safetensors"
    assert weights.stat().st_size < 20 * 2**20
    meta = read_config(DEFAULT_WEIGHTS)
    assert meta["stage"] == "ntm" and meta["config"].name == "small"
    assert meta["extra"]["trained_by"].startswith("trajflow-t2i train --preset small")


def test_the_shipped_model_follows_prompts_far_above_chance():
    """At 4 steps on fresh test prompts the colours are right far above the chance level
    (each image judged against another prompt of its kind), and so are whole prompts."""
    torch.set_num_threads(1)
    report = prompt_following(Pipeline.from_pretrained(), "test", 64, steps=4, cfg=3.0, seed=0)
    model, chance = report["accuracy"]["all"], report["chance"]["all"]
    assert model["colour"] >= 0.75 and model["colour"] >= chance["colour"] + 0.4, (model, chance)
    assert model["count"] >= chance["count"] + 0.08, (model, chance)
    assert model["ok"] >= chance["ok"] + 0.08, (model, chance)


def test_the_shipped_learned_denoiser_loads_and_stays_close_to_the_score_path():
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained()
    assert pipe.denoiser is not None
    prompts = ["a red circle left of a blue square", "two green triangles"]
    learned = pipe(prompts, n=4, steps=4, cfg=3.0, seed=1, denoiser="learned")
    score = pipe(prompts, n=4, steps=4, cfg=3.0, seed=1, denoiser="score")
    # Same chains, two denoisers: within a few 8-bit levels on average.
    assert (learned.float() - score.float()).abs().mean() < 4.0
