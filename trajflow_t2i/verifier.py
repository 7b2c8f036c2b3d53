"""A small CNN verifier: what a ``shapes`` or ``digits`` image shows, read by a classifier.

The verifier judges generated images without any downloaded model. It is trained on
ground-truth renders (the ``train`` split) by :func:`train_verifier`, deterministically from a
seed, in seconds on one CPU thread, and saved as ``verifier.safetensors`` + ``verifier.json``
(no pickle) by :meth:`Verifier.save`.

**Heads.** For ``shapes`` the scene is read in its canonical form (the one of
:meth:`trajflow_t2i.check.PromptSpec.canonical`: "B right of A" is "A left of B"), one head per
attribute, so attributes are predicted separately and combinations never seen in training (the
held-out colour–shape and colour pairs) can still be read:

- ``layout``: ``same`` (1–3 copies of one object: single and count scenes) or ``pair`` (two
  objects of different colours: relation scenes);
- ``count``: 1, 2 or 3 objects (a pair counts 2);
- ``colour``, ``shape``: the object of a ``same`` scene, or the first object (the left or upper
  one) of a pair;
- ``colour_b``, ``shape_b``, ``relation``: the second object of a pair and the relation
  (``left of`` or ``above``); not trained on ``same`` scenes.

For ``digits`` one head, ``digit``, reads the class 0–9. The penultimate layer (``features``
wide) is the feature space of the Fréchet distance (:func:`trajflow_t2i.evaluate.frechet_distance`).

Example:
    >>> verifier, report = train_verifier("shapes", n_train=64, steps=2, n_eval=16)
    >>> sorted(report["test"])
    ['colour', 'colour_b', 'count', 'exact', 'layout', 'relation', 'shape', 'shape_b']
    >>> data = make_split("shapes", "test", n=3, seed=5)
    >>> len(verifier.describe(data.images))
    3
    >>> verifier.embed(data.images).shape
    torch.Size([3, 128])
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trajflow_t2i.check import spec_of
from trajflow_t2i.data import COLOURS, SHAPES, DigitScene, Scene, make_split, to_float

__all__ = [
    "LAYOUTS",
    "VERIFIER_RELATIONS",
    "Verifier",
    "load_verifier",
    "scene_targets",
    "train_verifier",
    "verifier_accuracy",
    "verifier_for",
]

LAYOUTS: tuple[str, ...] = ("same", "pair")
#: The canonical relations: "right of" and "below" are read with the objects swapped.
VERIFIER_RELATIONS: tuple[str, ...] = ("left of", "above")
_HEADS: dict[str, dict[str, int]] = {
    "shapes": {
        "layout": len(LAYOUTS),
        "count": 3,
        "colour": len(COLOURS),
        "shape": len(SHAPES),
        "colour_b": len(COLOURS),
        "shape_b": len(SHAPES),
        "relation": len(VERIFIER_RELATIONS),
    },
    "digits": {"digit": 10},
}
_IMAGE: dict[str, tuple[int, tuple[int, ...]]] = {"shapes": (3, (16, 32)), "digits": (1, (8,))}
#: The heads of the shapes verifier that read the colour-blind geometry branch alone.
_GEOMETRY_HEADS = ("count", "shape", "shape_b", "relation")
#: Target of a head that does not apply to a scene (ignored by the loss and the accuracy).
IGNORE = -100
WEIGHTS_FILE = "verifier.safetensors"
META_FILE = "verifier.json"
FORMAT = "trajflow_t2i.verifier"


def scene_targets(scenes: Sequence[Scene | DigitScene]) -> dict[str, Tensor]:
    """Class index of every head for each scene (``-100`` where a head does not apply).

    Example:
        >>> from trajflow_t2i.data import ShapeObject
        >>> a = ShapeObject("circle", "red", (12.0, 8.0), 5, (10, 6, 15, 11))
        >>> b = ShapeObject("square", "blue", (4.0, 8.0), 5, (2, 6, 7, 11))
        >>> t = scene_targets([Scene("relation", (a, b), "right of", 2, 16)])
        >>> [COLOURS[t["colour"][0]], t["relation"].tolist()]  # read as "blue square left of…"
        ['blue', [0]]
    """
    if scenes and all(isinstance(s, DigitScene) for s in scenes):
        return {"digit": torch.tensor([s.label for s in scenes])}
    if not all(isinstance(s, Scene) for s in scenes):
        raise TypeError("scene_targets expected only shapes Scenes or only DigitScenes")
    rows = []
    for scene in scenes:
        key = spec_of(scene).canonical()
        if key[0] == "relation":
            _, (colour, shape), relation, (colour_b, shape_b) = key
            rows.append(
                (
                    1,
                    1,
                    COLOURS.index(colour),
                    SHAPES.index(shape),
                    COLOURS.index(colour_b),
                    SHAPES.index(shape_b),
                    VERIFIER_RELATIONS.index(relation),
                )
            )
        else:
            _, colour, shape, count = key
            rows.append((0, count - 1, COLOURS.index(colour), SHAPES.index(shape), *[IGNORE] * 3))
    table = torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(_HEADS["shapes"]))
    return {name: table[:, i] for i, name in enumerate(_HEADS["shapes"])}


class Verifier(nn.Module):
    """A multi-head CNN classifier of ``shapes`` scenes or ``digits``.

    For ``shapes`` the network is built so that one attribute cannot stand in for another,
    which is what lets it read the held-out combinations as well as the trained ones:

    - a **geometry** branch sees only where objects are (a colour-blind foreground map, in
      which every palette colour is equally bright) through four 3×3 convolutions, two of them
      strided, and a linear layer; the ``count``, ``shape``, ``shape_b`` and ``relation``
      heads read it alone, so a shape is never guessed from its colour;
    - a **colour** branch classifies each pixel (background or one of the colours) with 1×1
      convolutions, which cannot see shapes, and pools the maps 2×2. One small scorer, shared
      by all colours, reads each colour's map beside the foreground map and says whether that
      colour is the first object (``colour``) or the second (``colour_b``): colour ``c``'s
      logit depends on colour ``c``'s pixels only, so no colour pair can be learnt as a unit.
      A strided 3×3 convolution and a linear layer summarise the maps;
    - the ``layout`` head reads both summaries (linearly, so it cannot learn their
      combinations either).

    For ``digits`` the geometry branch reads the grey image itself and the ``digit`` head reads
    it. The penultimate features are the branch summaries side by side.

    Args:
        dataset: ``"shapes"`` or ``"digits"``.
        image_size: Side of the images (shapes 16 or 32, digits 8).
        width: Channels of the first convolutions (doubled after the first stride).
        features: Width of the penultimate layer (the Fréchet-distance features); each of the
            two branches of ``shapes`` gives half.
    """

    def __init__(self, dataset: str = "shapes", image_size: int = 16, width: int = 32,
                 features: int = 128):  # fmt: skip
        super().__init__()
        if dataset not in _HEADS:
            raise ValueError(f"Verifier expected dataset in {tuple(_HEADS)}, got {dataset!r}")
        channels, sizes = _IMAGE[dataset]
        if image_size not in sizes:
            raise ValueError(
                f"Verifier for {dataset} expected image_size in {sizes}, got {image_size!r}"
            )
        for name, value in (("width", width), ("features", features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"Verifier expected an integer {name} >= 2, got {value!r}")
        if dataset == "shapes" and features % 2:
            raise ValueError(f"Verifier for shapes expected an even features, got {features}")
        self.dataset, self.image_size, self.channels = dataset, image_size, channels
        self.width, self.features = width, features
        self.levels = 17 if dataset == "digits" else 256
        branch = features // 2 if dataset == "shapes" else features
        quarter = math.ceil(image_size / 4) ** 2
        self.geometry = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            # Flattening keeps where things are: the relation head needs positions.
            nn.Linear(2 * width * quarter, branch),
            nn.SiLU(),
        )
        if dataset == "shapes":
            classes = 1 + len(COLOURS)  # background and the colours
            self.pixel_colour = nn.Sequential(
                nn.Conv2d(3, width, 1), nn.SiLU(), nn.Conv2d(width, classes, 1)
            )
            self.colour_scorer = nn.Sequential(
                nn.Conv2d(2, width // 2, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
                nn.SiLU(),
                nn.Flatten(),
                nn.Linear(width * quarter, width),
                nn.SiLU(),
                nn.Linear(width, 3),  # is this colour the first object? the second? there?
            )
            self.colour_summary = nn.Sequential(
                nn.Conv2d(classes, 2 * width, 3, stride=2, padding=1),
                nn.SiLU(),
                nn.Flatten(),
                nn.Linear(2 * width * quarter, branch),
                nn.SiLU(),
            )
        self.heads = nn.ModuleDict(
            {
                # Layout reads the two highest presence scores: two colours make a pair.
                name: nn.Linear(2 if name == "layout" else branch, n)
                for name, n in _HEADS[dataset].items()
                if name not in ("colour", "colour_b")  # the colour scorer gives those
            }
        )

    def config(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {
            "dataset": self.dataset,
            "image_size": self.image_size,
            "width": self.width,
            "features": self.features,
        }

    def _prepare(self, images: Tensor) -> Tensor:
        """Integer levels or floats in ``[-1, 1]``, ``(B, C, H, W)``, as float32 in ``[-1, 1]``."""
        if not isinstance(images, Tensor):
            raise TypeError(f"Verifier expected images as a tensor, got {type(images).__name__}")
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Verifier ({self.dataset}) expected images (B, {', '.join(map(str, expected))}), "
                f"got shape {tuple(images.shape)}"
            )
        parameter = next(self.parameters())
        if images.is_floating_point():
            x = images.float().clamp(-1, 1)
        elif images.dtype == torch.uint8:
            x = to_float(images, self.levels)
        else:
            raise TypeError(f"Verifier expected uint8 levels or float images, got {images.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("Verifier expected finite images (found NaN or inf)")
        return x.to(parameter.device, parameter.dtype)

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Penultimate features ``(B, features)`` and the logits of every head."""
        x = self._prepare(images)
        if self.dataset == "digits":
            h = self.geometry(x)
            return h, {name: head(h) for name, head in self.heads.items()}
        # Every palette colour has a channel >= 180/255 (0.41 in [-1, 1]): saturating the
        # brightest channel from 0 up makes them all equal, with a margin for noise, so no
        # colour leaks through (black, -1, stays -1).
        foreground = (x.amax(dim=1, keepdim=True) + 1).clamp(0, 1) * 2 - 1
        geometry = self.geometry(foreground)
        maps = F.avg_pool2d(self.pixel_colour(x).softmax(dim=1), 2)  # (B, 1 + colours, h, w)
        colours = maps[:, 1:]
        pairs = torch.stack([colours, F.avg_pool2d(foreground, 2).expand_as(colours)], dim=2)
        scores = self.colour_scorer(pairs.flatten(0, 1)).view(len(x), colours.shape[1], 3)
        colour = self.colour_summary(maps)
        h = torch.cat([geometry, colour], dim=1)
        # Sorted, so the layout cannot depend on which colours they are.
        presence = scores[..., 2].topk(2, dim=1).values
        logits = {"layout": self.heads["layout"](presence)}
        logits |= {name: self.heads[name](geometry) for name in _GEOMETRY_HEADS}
        logits |= {"colour": scores[..., 0], "colour_b": scores[..., 1]}
        return h, {name: logits[name] for name in _HEADS["shapes"]}

    @torch.no_grad()
    def embed(self, images: Tensor, batch: int = 512) -> Tensor:
        """Penultimate-layer features ``(B, features)`` (eval mode, float32, on the CPU)."""
        return torch.cat([self(chunk)[0].float().cpu() for chunk in images.split(batch)])

    @torch.no_grad()
    def predict(self, images: Tensor, batch: int = 512) -> dict[str, Tensor]:
        """The most likely class index of every head, ``(B,)`` each."""
        parts = [
            {name: logits.argmax(-1).cpu() for name, logits in self(c)[1].items()}
            for c in images.split(batch)
        ]
        return {name: torch.cat([p[name] for p in parts]) for name in _HEADS[self.dataset]}

    def describe(self, images: Tensor) -> list[tuple]:
        """What each image shows, as a canonical key comparable with ``PromptSpec.canonical()``
        (``shapes``) or the digit class (``digits``)."""
        predicted = self.predict(images)
        if self.dataset == "digits":
            return predicted["digit"].tolist()
        rows = zip(*(predicted[name].tolist() for name in _HEADS["shapes"]), strict=True)
        keys = []
        for layout, count, colour, shape, colour_b, shape_b, relation in rows:
            if LAYOUTS[layout] == "pair":
                keys.append(
                    (
                        "relation",
                        (COLOURS[colour], SHAPES[shape]),
                        VERIFIER_RELATIONS[relation],
                        (COLOURS[colour_b], SHAPES[shape_b]),
                    )
                )
            else:
                keys.append(("count", COLOURS[colour], SHAPES[shape], count + 1))
        return keys

    def save(self, folder: str | os.PathLike, report: dict | None = None) -> Path:
        """Writes ``verifier.safetensors`` and ``verifier.json`` into ``folder`` atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "config": self.config(), "report": report or {}}
        for name, write in (
            (WEIGHTS_FILE, lambda path: save_file(tensors, path)),
            (META_FILE, lambda path: Path(path).write_text(json.dumps(meta, indent=2) + "\n")),
        ):
            handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            os.close(handle)
            try:
                write(temporary)
                os.replace(temporary, folder / name)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        return folder


def load_verifier(folder: str | os.PathLike) -> tuple[Verifier, dict]:
    """Loads a verifier saved by :meth:`Verifier.save`: the model (eval mode) and its report.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If a file is corrupt or does not fit the recorded configuration.
    """
    folder = Path(folder)
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: expected a verifier folder with {META_FILE} and {WEIGHTS_FILE}"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a verifier description (format {FORMAT!r})")
    try:
        verifier = Verifier(**meta["config"])
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{meta_path} holds an invalid verifier config: {error}") from None
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    try:
        verifier.load_state_dict(tensors)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not fit the verifier of {meta_path}: {error}") from None
    return verifier.eval(), meta.get("report", {})


def verifier_accuracy(
    verifier: Verifier, images: Tensor, scenes: Sequence[Scene | DigitScene]
) -> dict[str, float]:
    """Accuracy of every head on the images where it applies, and ``exact`` (every head right).

    Example:
        >>> v = Verifier("digits", 8)
        >>> data = make_split("digits", "test", n=20)
        >>> 0 <= verifier_accuracy(v, data.images, data.scenes)["digit"] <= 1
        True
    """
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images but {len(scenes)} scenes")
    targets, predicted = scene_targets(scenes), verifier.predict(images)
    result: dict[str, float] = {}
    exact = torch.ones(len(scenes), dtype=torch.bool)
    for name, target in targets.items():
        applies = target != IGNORE
        right = predicted[name] == target
        exact &= right | ~applies
        if applies.any():
            result[name] = round(float(right[applies].float().mean()), 4)
    if len(targets) > 1:
        result["exact"] = round(float(exact.float().mean()), 4)
    return dict(sorted(result.items()))


def _loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    total = logits[next(iter(logits))].new_zeros(())
    for name, target in targets.items():
        if (target != IGNORE).any():
            total = total + F.cross_entropy(logits[name], target, ignore_index=IGNORE)
    return total


#: Training defaults per dataset: 20-30 s (shapes) and about 15 s (digits) of one CPU thread.
_DEFAULTS = {
    "shapes": {"steps": 1000, "width": 32, "shift": 0, "noise": 0.2, "blur": 1.0},
    "digits": {"steps": 1500, "width": 64, "shift": 2, "noise": 0.1, "blur": 0.0},
}


def _augment(x: Tensor, noise: float, blur: float, generator: torch.Generator) -> Tensor:
    """A random blend with the 3×3 box blur, then Gaussian noise, each of a random amount."""
    shape = (len(x), 1, 1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + blur * torch.rand(shape, generator=generator) * (blurred - x)
    return x + noise * torch.rand(shape, generator=generator) * torch.randn(
        x.shape, generator=generator
    )


def _shifted(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by up to ``shift`` pixels each way, the border filled with black."""
    size = x.shape[-1]
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    offsets = torch.randint(2 * shift + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)]
    )


def train_verifier(
    dataset: str = "shapes",
    image_size: int | None = None,
    n_train: int = 6000,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    noise: float | None = None,
    blur: float | None = None,
    shift: int | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    n_eval: int = 500,
    width: int | None = None,
    features: int = 128,
) -> tuple[Verifier, dict]:
    """Trains a verifier on ground-truth renders; deterministic for a seed (and thread count).

    AdamW with a cosine-decayed learning rate on ``n_train`` images of the ``train`` split. Each
    batch is uniformly dequantised, blended by a random fraction in ``[0, blur]`` with its
    3×3 box blur, and gets Gaussian noise of a random level in ``[0, noise]`` (per image):
    a sampler's images have soft edges and some noise, and must still read. The global
    random state is left alone.

    Args:
        dataset: ``"shapes"`` or ``"digits"``.
        image_size: Image side (default 16 for shapes, 8 for digits).
        n_train: Training renders (digits: at most the 1500 of the train split).
        steps: Optimisation steps (default 1000 for shapes, 1500 for digits).
        batch_size: Images per step.
        lr: Peak learning rate.
        noise: Largest standard deviation of the added Gaussian noise (in ``[-1, 1]`` units;
            default 0.2 for shapes, 0.1 for digits).
        blur: Largest weight of the blurred image in the blend (0: no blur; default 1 for
            shapes, 0 for digits).
        shift: Largest random translation in pixels (default 2 for digits, 0 for shapes).
        weight_decay: AdamW's decoupled weight decay.
        seed: Seeds the initial weights, the data draw and every batch.
        n_eval: Renders of each evaluation split (``test``, and for shapes ``heldout``).
        width, features: See :class:`Verifier` (default width 32 for shapes, 64 for digits).

    Returns:
        The verifier (eval mode) and a report: the training settings and its accuracy per
        head on the ``test`` (and ``heldout``) renders (:func:`verifier_accuracy`).
    """
    if dataset not in _HEADS:
        raise ValueError(f"train_verifier expected dataset in {tuple(_HEADS)}, got {dataset!r}")
    defaults = _DEFAULTS[dataset]
    image_size = image_size or _IMAGE[dataset][1][0]
    steps = defaults["steps"] if steps is None else steps
    width = defaults["width"] if width is None else width
    # Digits are few (1500) and vary in where they sit: small shifts keep the CNN from
    # memorising them. Shapes are many, and where an object is matters to the heads.
    shift = defaults["shift"] if shift is None else shift
    # Sampled shapes have soft edges and some noise; digits are smooth already, and the
    # extra noise only costs them accuracy.
    noise = defaults["noise"] if noise is None else noise
    blur = defaults["blur"] if blur is None else blur
    counts = {"n_train": n_train, "steps": steps, "batch_size": batch_size, "n_eval": n_eval}
    for name, value in [*counts.items(), ("shift", shift)]:
        least = 0 if name == "shift" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"train_verifier expected an integer {name} >= {least}, got {value!r}")
    for name, value, low in (
        ("lr", lr, 0.0),
        ("noise", noise, 0.0),
        ("blur", blur, 0.0),
        ("weight_decay", weight_decay, 0.0),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            raise ValueError(f"train_verifier expected a finite {name} >= {low}, got {value!r}")
    if lr == 0 or blur > 1:
        raise ValueError(f"train_verifier expected lr > 0 and blur <= 1, got {lr} and {blur}")
    if dataset == "digits":
        n_train = min(n_train, 1500)
    data = make_split(dataset, "train", n=n_train, seed=seed, size=image_size)
    targets = scene_targets(data.scenes)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        verifier = Verifier(dataset, image_size, width, features)
    optimizer = torch.optim.AdamW(verifier.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    verifier.train()
    for _ in range(steps):
        index = torch.randint(len(data), (batch_size,), generator=generator)
        levels = data.images[index].float()
        x = 2 * (levels + torch.rand(levels.shape, generator=generator)) / data.levels - 1
        x = _augment(x, noise, blur, generator)
        if shift:
            x = _shifted(x, shift, generator)
        loss = _loss(verifier(x)[1], {name: t[index] for name, t in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    verifier.eval()
    report: dict[str, Any] = {
        "dataset": dataset,
        "image_size": image_size,
        "n_train": n_train,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "noise": noise,
        "blur": blur,
        "shift": shift,
        "weight_decay": weight_decay,
        "seed": seed,
    }
    for split in ("test", "heldout") if dataset == "shapes" else ("test",):
        n = n_eval if dataset == "shapes" else min(n_eval, 297)
        # A different seed from the training draw: fresh scenes, not a prefix of it.
        held = make_split(dataset, split, n=n, seed=seed + 1, size=image_size)
        report[split] = verifier_accuracy(verifier, held.images, held.scenes)
        report[f"{split}_images"] = n
    return verifier, report


def verifier_for(
    dataset: str, image_size: int | None = None, cache: str | os.PathLike | None = None, **options
) -> tuple[Verifier, dict]:
    """The verifier cached in ``cache`` if it is there and fits, else a newly trained one.

    A newly trained verifier is saved to ``cache`` (when given). A cached one made for another
    dataset or image size is an error rather than silently replaced.

    Args:
        dataset, image_size: What it must read.
        cache: A folder for :meth:`Verifier.save` / :func:`load_verifier`, or None.
        options: Passed to :func:`train_verifier`.
    """
    image_size = image_size or _IMAGE.get(dataset, (0, (None,)))[1][0]
    if cache is not None and (Path(cache) / META_FILE).exists():
        verifier, report = load_verifier(cache)
        if (verifier.dataset, verifier.image_size) != (dataset, image_size):
            raise ValueError(
                f"the verifier in {cache} reads {verifier.dataset} at {verifier.image_size}px, "
                f"but {dataset} at {image_size}px is needed"
            )
        return verifier, report
    verifier, report = train_verifier(dataset, image_size, **options)
    if cache is not None:
        verifier.save(cache, report)
    return verifier, report
