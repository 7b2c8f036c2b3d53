"""Evaluation without downloads: compositional accuracy, Fréchet distance, bits/dim.

Everything a text-to-image checkpoint is judged by, computed from this package alone:

- **Compositional accuracy** (GenEval-style, :func:`compositional_accuracy`): a
  :class:`~trajflow_t2i.verifier.Verifier` reads each generated image and the reading is
  compared with the prompt's parsed specification (:func:`trajflow_t2i.check.parse_prompt`),
  per category of :data:`CATEGORIES`; reported beside the rule-based check
  (:func:`trajflow_t2i.check.accuracy`), on test prompts and on held-out-combination prompts.
- **Fréchet distance** (:func:`frechet_distance`) between generated and real images in the
  verifier's penultimate feature space (an FID without Inception).
- **Bits/dim** of every likelihood model on one stated variable
  (:mod:`trajflow_t2i.likelihood`): the NTM's variational bound, a normalizing flow's exact
  density and flow matching through its probability-flow ODE with the exact divergence.

:func:`run_eval` runs them all on a checkpoint; ``trajflow-t2i eval`` is its command line.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3))
    >>> frechet_distance(a, b) < 0.02, round(frechet_distance(a, b + 1.0))
    (True, 3)
    >>> compositional_accuracy([("count", "red", "circle", 2)], ["two red circles"])["count"]
    {'accuracy': 1.0, 'n': 1}
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from trajflow.checks import check_count
from trajflow_t2i.check import PromptSpec, accuracy, check_images, parse_prompt, spec_of
from trajflow_t2i.data import (
    COLOURS,
    DIGIT_WORDS,
    SHAPES,
    DigitScene,
    Scene,
    make_split,
    split_words,
)
from trajflow_t2i.likelihood import model_bits_per_dim

__all__ = [
    "CATEGORIES",
    "compositional_accuracy",
    "digit_of_prompt",
    "frechet_distance",
    "gaussian_frechet_distance",
    "run_eval",
    "score_images",
    "summary",
    "write_json",
]

# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def _features(name: str, value) -> np.ndarray:
    array = value.detach().cpu().double().numpy() if isinstance(value, Tensor) else value
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(
            f"expected {name} to be features (N >= 2, D >= 1), got shape {tuple(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"expected finite {name} (found NaN or inf)")
    return array


def gaussian_frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """``‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^{1/2})``: the squared 2-Wasserstein distance of two
    Gaussians.

    The matrix square root comes from ``scipy.linalg.sqrtm``. Estimated covariances of few
    samples are singular, and then the root can pick up round-off that is imaginary or not
    finite: in that case ``eps`` is added to both diagonals and the root taken again (as in
    the reference FID code), and only the real part is kept. The result is clipped at 0.

    Example:
        >>> gaussian_frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))
        4.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, float)), np.atleast_2d(np.asarray(cov2, float))
    dims = mu1.shape[0]
    if mu2.shape != (dims,) or cov1.shape != (dims, dims) or cov2.shape != (dims, dims):
        raise ValueError(
            f"expected means (D,) and covariances (D, D) of one D, got {mu1.shape}, "
            f"{cov1.shape}, {mu2.shape}, {cov2.shape}"
        )
    root = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all() or np.abs(np.imag(root)).max(initial=0) > 1e-3:
        offset = eps * np.eye(dims)
        root = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    root = np.real(root)
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(root)
    return float(max(distance, 0.0))


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """Fréchet distance between two feature samples ``(N, D)`` and ``(M, D)`` (array or tensor).

    Fits a Gaussian to each (mean, unbiased covariance) and returns
    :func:`gaussian_frechet_distance`. With few samples it is biased upwards (two samples of
    one distribution are not at 0): compare models at the same sample size, and beside
    the distance between two real samples of that size.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features of different widths: {a.shape} and {b.shape}")
    return gaussian_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False), eps
    )


# ---------------------------------------------------------------------------------------------
# Compositional accuracy
# ---------------------------------------------------------------------------------------------

#: GenEval-style categories, and which prompts each one judges:
#:
#: - ``single object`` (single-object prompts): exactly one object, of the prompted shape;
#: - ``colour`` (single and count prompts): the objects have the prompted shape and colour;
#: - ``count`` (count prompts): the prompted number of objects of the prompted shape;
#: - ``two objects`` (relation prompts): both prompted objects (colour and shape), in any place;
#: - ``position`` (relation prompts): both objects, in the prompted relation.
#:
#: ``digit`` (digits prompts) is the right class.
CATEGORIES: tuple[str, ...] = ("single object", "colour", "count", "two objects", "position")


def digit_of_prompt(prompt: str) -> int:
    """The digit a ``digits`` caption asks for.

    Example:
        >>> digit_of_prompt("a handwritten seven")
        7
    """
    if not isinstance(prompt, str):
        raise TypeError(f"digit_of_prompt expected a str, got {type(prompt).__name__}")
    found = [DIGIT_WORDS.index(w) for w in split_words(prompt) if w in DIGIT_WORDS]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one digit word ({', '.join(DIGIT_WORDS)}) in {prompt!r}, "
            f"got {len(found)}"
        )
    return found[0]


_SHAPES_WORDS = frozenset({*COLOURS, *SHAPES, *(f"{shape}s" for shape in SHAPES)})


def _spec(prompt) -> PromptSpec | int:
    if isinstance(prompt, PromptSpec):
        return prompt
    if isinstance(prompt, Scene):
        return spec_of(prompt)
    if isinstance(prompt, DigitScene):
        return prompt.label
    if isinstance(prompt, int) and not isinstance(prompt, bool) and 0 <= prompt <= 9:
        return prompt  # a digit label
    if isinstance(prompt, str):
        # Shapes prompts name a colour or a shape; digits captions never do.
        if _SHAPES_WORDS.isdisjoint(split_words(prompt)):
            return digit_of_prompt(prompt)
        return parse_prompt(prompt)
    raise TypeError(
        f"expected a prompt str, Scene, DigitScene, PromptSpec or digit 0-9, got {prompt!r:.60}"
    )


def _judge(reading, spec: PromptSpec | int) -> dict[str, bool]:
    """Which categories an image that the verifier read as ``reading`` satisfies."""
    if isinstance(spec, int):
        return {"digit": reading == spec, "exact": reading == spec}
    wanted = spec.canonical()
    if not isinstance(reading, tuple):
        raise TypeError(f"a shapes prompt needs a shapes reading, got {reading!r}")
    verdict = {"exact": reading == wanted}
    if spec.kind == "relation":
        pair = reading[0] == "relation"
        verdict["two objects"] = pair and {reading[1], reading[3]} == set(spec.objects)
        verdict["position"] = verdict["exact"]
        return verdict
    colour, shape = spec.objects[0]
    same = reading[0] == "count" and reading[2] == shape
    verdict["colour"] = same and reading[1] == colour
    if spec.kind == "single":
        verdict["single object"] = same and reading[3] == 1
    else:
        verdict["count"] = same and reading[3] == spec.count
    return verdict


def compositional_accuracy(readings: Sequence, prompts: Sequence) -> dict[str, Any]:
    """GenEval-style accuracy of verifier readings against their prompts.

    Args:
        readings: What the verifier saw in each image (:meth:`Verifier.describe`).
        prompts: The prompt of each image: captions, scenes or specs.

    Returns:
        ``{category: {"accuracy", "n"}}`` for each category judged at least once, ``overall``
        (the mean over those categories, as GenEval reports), ``exact`` (the image is exactly
        what was asked, ``{"accuracy", "n"}``) and ``by_kind`` (exact per prompt kind).
    """
    if len(readings) != len(prompts):
        raise ValueError(f"got {len(readings)} readings but {len(prompts)} prompts")
    specs = [_spec(p) for p in prompts]
    verdicts = [_judge(r, s) for r, s in zip(readings, specs, strict=True)]
    table: dict[str, Any] = {}
    for category in (*CATEGORIES, "digit"):
        values = [v[category] for v in verdicts if category in v]
        if values:
            table[category] = {"accuracy": round(sum(values) / len(values), 4), "n": len(values)}
    judged = [table[c]["accuracy"] for c in table]
    table["overall"] = round(sum(judged) / len(judged), 4) if judged else None
    exact = [v["exact"] for v in verdicts]
    table["exact"] = {
        "accuracy": round(sum(exact) / len(exact), 4) if exact else None,
        "n": len(exact),
    }
    kinds = [s.kind if isinstance(s, PromptSpec) else "digit" for s in specs]
    table["by_kind"] = {
        kind: round(
            sum(e for e, k in zip(exact, kinds, strict=True) if k == kind) / kinds.count(kind), 4
        )
        for kind in sorted(set(kinds))
    }
    return table


def _derangement(kinds: Sequence[str], generator: torch.Generator) -> list[int]:
    """Each index mapped to another of the same kind (a cyclic shift of a random order)."""
    order = list(range(len(kinds)))
    for kind in sorted(set(kinds)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        shuffled = [members[i] for i in torch.randperm(len(members), generator=generator)]
        for j, index in enumerate(shuffled):
            order[index] = shuffled[(j + 1) % len(shuffled)]
    return order


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------


def write_json(report: dict, path: str | os.PathLike) -> Path:
    """Writes ``report`` as JSON to ``path`` atomically (a temporary file, then renamed)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(json.dumps(report, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _generate(model, prompts, steps, cfg, seed, batch=64) -> Tensor:
    return torch.cat(
        [
            model.generate(
                prompts[i : i + batch],
                steps=steps,
                cfg=cfg,
                generator=torch.Generator().manual_seed(seed + i),
            )
            for i in range(0, len(prompts), batch)
        ]
    ).cpu()


def score_images(
    verifier,
    images: Tensor,
    prompts: Sequence,
    real: Tensor,
    reference: Tensor | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """How well generated ``images`` follow their ``prompts`` and match ``real`` images.

    Args:
        verifier: A :class:`~trajflow_t2i.verifier.Verifier` for the images' dataset.
        images: One generated image per prompt, floats in ``[-1, 1]`` or uint8 levels.
        prompts: Captions (or scenes, specs) the images were generated for.
        real: Real images of the same distribution (e.g. those of the same captions).
        reference: Another real sample of the size of ``images``: its distance to ``real``
            is reported as ``frechet_distance_real``, the floor at this sample size.
        seed: Seeds the prompt derangement of the chance levels.

    Returns:
        ``verifier`` (:func:`compositional_accuracy`) and ``verifier_chance`` (the same with
        each image judged against another prompt of its kind); for shapes ``rule_check`` and
        ``rule_check_chance`` (:func:`trajflow_t2i.check.accuracy` per kind);
        ``frechet_distance`` in the verifier's feature space, and ``frechet_distance_real``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    specs = [_spec(p) for p in prompts]
    kinds = [s.kind if isinstance(s, PromptSpec) else "digit" for s in specs]
    order = _derangement(kinds, torch.Generator().manual_seed(seed))
    mismatched = [specs[i] for i in order]
    readings = verifier.describe(images)
    real_features = verifier.embed(real)
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "verifier": compositional_accuracy(readings, specs),
        "verifier_chance": compositional_accuracy(readings, mismatched),
        "frechet_distance": round(frechet_distance(verifier.embed(images), real_features), 4),
    }
    if reference is not None:
        distance = frechet_distance(verifier.embed(reference), real_features)
        report["frechet_distance_real"] = round(distance, 4)
    if verifier.dataset == "shapes":
        report["rule_check"] = accuracy(check_images(images, specs), kinds)
        report["rule_check_chance"] = accuracy(check_images(images, mismatched), kinds)
    return report


def _split_report(model, verifier, split, n, steps, cfg, seed) -> dict[str, Any]:
    config = model.config.data
    data = make_split(config.name, split, n=n, seed=seed + 1, size=config.image_size)
    images = _generate(model, data.captions, steps, cfg, seed)
    # Digits have one test split: the reference sample comes from the training images.
    other_split = "train" if config.name == "digits" else split
    other = make_split(config.name, other_split, n=n, seed=seed + 2, size=config.image_size)
    return score_images(verifier, images, data.captions, data.images, other.images, seed)


def run_eval(
    model,
    n: int = 256,
    steps: int = 4,
    cfg: float = 3.0,
    seed: int = 0,
    verifier=None,
    verifier_report: dict | None = None,
    bpd_images: int = 128,
    ode_steps: int = 32,
    max_ode_dims: int = 256,
) -> dict[str, Any]:
    """Evaluates a :class:`~trajflow_t2i.model.TextToImage` on its dataset.

    For each split (``test``, and ``heldout`` for shapes) ``n`` captions are drawn, one image
    generated per caption, and reported: the verifier's compositional accuracy and its chance
    level (each image judged against another caption of its kind), the rule-based check and
    its chance level (shapes), and the Fréchet distance to the real images of those captions
    in the verifier's feature space, beside the distance between two real samples of size
    ``n``. Then bits/dim on ``bpd_images`` test images
    (:func:`~trajflow_t2i.likelihood.model_bits_per_dim`; the FM stage only when
    ``D <= max_ode_dims``, its exact divergence costs ``D`` backward rows).

    Args:
        model: The model (eval mode).
        n: Prompts per split (digits test has 297 at most).
        steps: Sampling steps (and the ``T`` of the NTM bound).
        cfg: Guidance weight.
        seed: Seeds captions, sampling and the likelihood variable.
        verifier: A trained :class:`~trajflow_t2i.verifier.Verifier` for the model's data
            (default: one trained now, deterministically).
        verifier_report: Its report (accuracies on renders), copied into the result.
        bpd_images: Test images of the bits/dim estimate (0: skip).
        ode_steps: RK4 steps of the FM-stage likelihood.
        max_ode_dims: Largest ``D`` for which the FM-stage likelihood is computed.
    """
    from trajflow_t2i.verifier import verifier_for

    config = model.config.data
    n = check_count("run_eval", "n", n)
    if config.name == "digits":
        n = min(n, 297)
    began = time.perf_counter()
    if verifier is None:
        verifier, verifier_report = verifier_for(config.name, config.image_size)
    if (verifier.dataset, verifier.image_size) != (config.name, config.image_size):
        raise ValueError(
            f"the verifier reads {verifier.dataset} at {verifier.image_size}px but the model "
            f"makes {config.name} at {config.image_size}px"
        )
    report: dict[str, Any] = {
        "dataset": config.name,
        "image_size": config.image_size,
        "stage": model.stage,
        "sampling": {"steps": steps, "cfg": cfg, "seed": seed, "prompts_per_split": n},
        "verifier": verifier_report or {},
        "splits": {},
    }
    splits = ("test", "heldout") if config.name == "shapes" else ("test",)
    for split in splits:
        report["splits"][split] = _split_report(model, verifier, split, n, steps, cfg, seed)
    report["bits_per_dim"] = None
    dims = config.channels * config.image_size**2
    if bpd_images and (model.stage == "ntm" or dims <= max_ode_dims):
        size = config.image_size
        test = make_split(config.name, "test", n=min(bpd_images, n), seed=seed + 3, size=size)
        likelihood = model_bits_per_dim(
            model,
            test.images,
            test.captions,
            steps=steps,
            ode_steps=ode_steps,
            generator=torch.Generator().manual_seed(seed),
        )
        report["bits_per_dim"] = likelihood.summary()
    elif bpd_images:
        report["bits_per_dim_skipped"] = (
            f"the FM stage's exact ODE likelihood at D = {dims} > {max_ode_dims} is too slow here"
        )
    report["seconds"] = round(time.perf_counter() - began, 1)
    return report


def summary(report: dict[str, Any]) -> str:
    """A few plain lines of a :func:`run_eval` report for the terminal."""
    sampling = report["sampling"]
    lines = [
        f"{report['dataset']} {report['image_size']}px, stage {report['stage']}, "
        f"{sampling['steps']} steps, cfg {sampling['cfg']}, "
        f"{sampling['prompts_per_split']} prompts per split"
    ]
    for split, part in report["splits"].items():
        verifier, chance = part["verifier"], part["verifier_chance"]
        categories = ", ".join(
            f"{name} {verifier[name]['accuracy']:.2f}"
            for name in (*CATEGORIES, "digit")
            if name in verifier
        )
        line = (
            f"{split}: verifier exact {verifier['exact']['accuracy']:.2f} "
            f"(chance {chance['exact']['accuracy']:.2f}); {categories}"
        )
        if "rule_check" in part:
            line += f"; rule check ok {part['rule_check']['all']['ok']:.2f}"
        line += (
            f"; Fréchet distance {part['frechet_distance']:.3f} "
            f"(real vs real {part['frechet_distance_real']:.3f})"
        )
        lines.append(line)
    bpd = report.get("bits_per_dim")
    if bpd:
        lines.append(f"bits/dim {bpd['bits_per_dim']} on {bpd['images']} test images")
        lines.append(f"  variable: {bpd['variable']}; {bpd['method']}")
    elif report.get("bits_per_dim_skipped"):
        lines.append(f"bits/dim skipped: {report['bits_per_dim_skipped']}")
    return "\n".join(lines)
