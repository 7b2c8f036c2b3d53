"""Captioned image datasets, generated deterministically from a seed (nothing is downloaded).

Two datasets are registered in :data:`T2I_DATASETS` and built with :func:`make_split`:

- ``shapes``: procedural scenes at 16×16 or 32×32 RGB on black with 1–3 non-overlapping objects
  (shapes :data:`SHAPES`, colours :data:`PALETTE` with exact RGB values). Scene kinds
  (:data:`KINDS`): ``single`` ("a red circle"), ``count`` (1–3 identical objects, "two green
  triangles") and ``relation`` (two objects of *different colours*, "a red circle left of a blue
  square", relations :data:`RELATIONS`; the relation holds along its axis by at least a 1-pixel
  gap, and the offset across the axis is at most half the offset along it). Captions come from
  several paraphrase templates (:func:`paraphrases`).
- ``digits``: the 1797 8×8 handwritten digits that ship with scikit-learn (values 0..16),
  captioned ("a handwritten seven").

**Held-out combinations.** The colour–shape pairs :data:`HELDOUT_PAIRS` (in any object of any
scene) and the colour pairs :data:`HELDOUT_COLOUR_PAIRS` (the two colours of a relation, in
either order) never occur in ``split="train"`` (nor in ``"test"``, a fresh draw from the training
distribution). ``split="heldout"`` holds only scenes containing at least one of them, drawn
from the unrestricted distribution conditioned on that, for compositional evaluation.

**Pixel values.** Images are stored as integer levels ``k`` in ``0..K-1`` (uint8; ``K = 256`` for
shapes, ``K = 17`` for digits). The float view (:func:`to_float`, what a dataset item returns)
is the centre of the level's cell, ``x = (2k + 1)/K - 1`` in ``(-1, 1)``, which is the mean of
the uniformly dequantised variable ``x = 2(k + u)/K - 1``, ``u ~ U[0, 1)`` drawn by
:func:`dequantize` in the training code. A density ``p`` on that variable bounds the bits/dim
of the discrete data: ``-log2 P(k)/D ≤ (E_u[-ln p(x)]/D + ln(K/2))/ln 2`` (the cell has volume
``(2/K)^D``); pass ``quantization_levels=K`` to :meth:`trajflow.ntm.NTM.data_bound`. For digits
this is the usual variable of the 8×8, 17-level data, so the numbers compare with published ones.

Example:
    >>> data = make_split("shapes", "train", n=4, seed=0, size=16)
    >>> data.images.shape, data.images.dtype, len(data.captions)
    (torch.Size([4, 3, 16, 16]), torch.uint8, 4)
    >>> image, caption, scene = data[0]
    >>> image.shape, caption == data.captions[0], scene.kind in KINDS
    (torch.Size([3, 16, 16]), True, True)
    >>> caption in paraphrases(scene)
    True
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from trajflow.registry import Registry

__all__ = [
    "COLOURS",
    "COUNT_WORDS",
    "DIGIT_WORDS",
    "HELDOUT_COLOUR_PAIRS",
    "HELDOUT_PAIRS",
    "KINDS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "T2I_DATASETS",
    "CaptionedImages",
    "DigitScene",
    "Scene",
    "ShapeObject",
    "dequantize",
    "heldout_combinations",
    "make_split",
    "paraphrases",
    "render",
    "split_words",
    "to_float",
    "to_uint8",
    "vocabulary",
]

#: The exact RGB value of every colour word.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "count", "relation")
SPLITS: tuple[str, ...] = ("train", "test", "heldout")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
DIGIT_WORDS: tuple[str, ...] = (
    *("zero", "one", "two", "three", "four"),
    *("five", "six", "seven", "eight", "nine"),
)

#: Colour–shape pairs that never appear in training: every colour and every shape still does.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("white", "square"), ("green", "diamond")}
)
#: Unordered colour pairs that never appear together in a training relation scene.
HELDOUT_COLOUR_PAIRS: frozenset[frozenset[str]] = frozenset(
    {frozenset({"blue", "yellow"}), frozenset({"red", "green"})}
)

#: Object side lengths (bounding box, pixels), inclusive range per image size.
OBJECT_SIZES: dict[int, tuple[int, int]] = {16: (5, 7), 32: (9, 14)}
INVERSE_RELATION = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a shapes scene.

    Attributes:
        shape: One of :data:`SHAPES`.
        colour: One of :data:`COLOURS`.
        centre: ``(x, y)`` of the bounding-box centre in pixels (x to the right, y down).
        size: Side of the square bounding box in pixels.
        bbox: ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.
    """

    shape: str
    colour: str
    centre: tuple[float, float]
    size: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """Ground truth of a shapes image.

    Attributes:
        kind: One of :data:`KINDS`.
        objects: The objects; for ``relation``, ``objects[0] <relation> objects[1]``.
        relation: One of :data:`RELATIONS` for ``relation`` scenes, else None.
        count: Number of objects (1 for ``single``, 1–3 for ``count``, 2 for ``relation``).
        image_size: Height and width of the image.
    """

    kind: str
    objects: tuple[ShapeObject, ...]
    relation: str | None
    count: int
    image_size: int


@dataclass(frozen=True)
class DigitScene:
    """Ground truth of a digits image: its label 0–9."""

    label: int
    kind: str = "digit"


def split_words(text: str) -> list[str]:
    """Lower-cases ``text`` and splits it into words at whitespace and punctuation.

    Example:
        >>> split_words("A red circle, left of a BLUE square!")
        ['a', 'red', 'circle', 'left', 'of', 'a', 'blue', 'square']
    """
    # \w keeps non-ASCII letters inside words, so an unknown word is reported whole.
    return re.findall(r"\w+", text.lower())


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(colour: str, shape: str) -> str:
    return f"{_a(colour)} {colour} {shape}"


def _single_captions(colour: str, shape: str) -> list[str]:
    phrase = _noun_phrase(colour, shape)
    return [
        phrase,
        f"one {colour} {shape}",
        f"a single {colour} {shape}",
        f"{phrase} on black",
        f"{phrase} on a black background",
        f"there is {phrase}",
    ]


def _count_captions(count: int, colour: str, shape: str) -> list[str]:
    number, noun = COUNT_WORDS[count - 1], shape if count == 1 else f"{shape}s"
    verb = "is" if count == 1 else "are"
    return [
        f"{number} {colour} {noun}",
        f"exactly {number} {colour} {noun}",
        f"{number} {colour} {noun} on black",
        f"there {verb} {number} {colour} {noun}",
    ]


_RELATION_PHRASES = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "beneath"),
}


def _relation_captions(first: tuple[str, str], relation: str, second: tuple[str, str]) -> list[str]:
    captions = []
    # Both word orders: "A left of B" and the same fact told from B, "B right of A".
    for subject, rel, obj in (
        (first, relation, second),
        (second, INVERSE_RELATION[relation], first),
    ):
        a, b = _noun_phrase(*subject), _noun_phrase(*obj)
        for phrase in _RELATION_PHRASES[rel]:
            captions += [f"{a} {phrase} {b}", f"{a} is {phrase} {b}", f"there is {a} {phrase} {b}"]
    return captions


def _digit_captions(label: int) -> list[str]:
    word = DIGIT_WORDS[label]
    return [
        f"a handwritten {word}",
        f"{_a(word)} {word}, written by hand",
        f"the digit {word}",
        f"a handwritten digit {word}",
        f"the number {word}",
    ]


def paraphrases(scene: Scene | DigitScene) -> list[str]:
    """Every caption the templates give for ``scene`` (all mean the same), in a fixed order.

    Example:
        >>> obj = ShapeObject("circle", "orange", (8.0, 8.0), 6, (5, 5, 11, 11))
        >>> paraphrases(Scene("single", (obj,), None, 1, 16))[:2]
        ['an orange circle', 'one orange circle']
    """
    if isinstance(scene, DigitScene):
        return _digit_captions(scene.label)
    first = scene.objects[0]
    if scene.kind == "single":
        return _single_captions(first.colour, first.shape)
    if scene.kind == "count":
        return _count_captions(scene.count, first.colour, first.shape)
    if scene.kind == "relation":
        second = scene.objects[1]
        return _relation_captions(
            (first.colour, first.shape), scene.relation, (second.colour, second.shape)
        )
    raise ValueError(f"unknown scene kind {scene.kind!r}; expected one of {KINDS}")


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    captions = [c for label in range(10) for c in _digit_captions(label)]
    for colour in COLOURS:
        for shape in SHAPES:
            captions += _single_captions(colour, shape)
            for count in (1, 2, 3):
                captions += _count_captions(count, colour, shape)
            other = next(c for c in COLOURS if c != colour)
            for relation in RELATIONS:
                captions += _relation_captions((colour, shape), relation, (other, shape))
    return tuple(sorted({word for caption in captions for word in split_words(caption)}))


def vocabulary() -> list[str]:
    """Every word any caption template of any dataset can produce, sorted.

    Example:
        >>> {"red", "circles", "left", "handwritten", "seven"} <= set(vocabulary())
        True
    """
    return list(_vocabulary())


# ---------------------------------------------------------------------------------------------
# Pixel values
# ---------------------------------------------------------------------------------------------


def _check_levels(levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ValueError(f"expected levels to be an integer in [2, 256], got {levels!r}")


def to_float(images: Tensor, levels: int = 256) -> Tensor:
    """Maps integer levels ``k`` to the cell centres ``(2k + 1)/K - 1`` (float32).

    Example:
        >>> to_float(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-0.9961,  0.9961])
    """
    _check_levels(levels)
    return (2 * images.float() + 1) / levels - 1


def to_uint8(x: Tensor, levels: int = 256) -> Tensor:
    """Inverse of :func:`to_float` and of :func:`dequantize`: ``k = floor((x + 1) K / 2)``, clamped.

    Example:
        >>> to_uint8(to_float(torch.arange(17), levels=17), levels=17).tolist() == list(range(17))
        True
    """
    _check_levels(levels)
    if not x.is_floating_point():
        raise TypeError(f"to_uint8 expected a float tensor in [-1, 1], got {x.dtype}")
    return torch.floor((x.float() + 1) * (levels / 2)).clamp(0, levels - 1).to(torch.uint8)


def dequantize(
    images_uint8: Tensor, generator: torch.Generator | None = None, levels: int = 256
) -> Tensor:
    """Uniform dequantisation: ``x = 2(k + u)/K - 1`` with ``u ~ U[0, 1)``, float32 in ``[-1, 1)``.

    Args:
        images_uint8: Integer levels ``k`` in ``0..K-1`` (any integer dtype, any shape).
        generator: Seeds ``u`` (on its own device; the result is on the images' device).
        levels: ``K``.

    Example:
        >>> k = torch.tensor([0, 16], dtype=torch.uint8)
        >>> (to_uint8(dequantize(k, levels=17), levels=17) == k).all().item()
        True
    """
    _check_levels(levels)
    if images_uint8.is_floating_point() or images_uint8.dtype == torch.bool:
        raise TypeError(f"dequantize expected integer levels, got {images_uint8.dtype}")
    if images_uint8.numel() and int(images_uint8.max()) >= levels:
        raise ValueError(
            f"dequantize expected levels k in [0, {levels - 1}], got max {int(images_uint8.max())}"
        )
    # Drawn where the generator lives (a CPU generator may seed CUDA images), then moved.
    device = images_uint8.device if generator is None else generator.device
    noise = torch.rand(images_uint8.shape, generator=generator, device=device)
    return 2 * (images_uint8.float() + noise.to(images_uint8.device)) / levels - 1


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@functools.cache
def _mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a shape in its bounding box, from pixel centres."""
    centres = (np.arange(size) + 0.5) / size
    v, u = np.meshgrid(centres, centres, indexing="ij")  # v: rows (down), u: columns
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25 + 1e-9
    if shape == "triangle":  # apex up; each row as wide as the triangle at the row's lower edge
        return np.abs(u - 0.5) <= (v + 0.5 / size) / 2 + 1e-9
    if shape == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5 + 1e-9
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scenes: Sequence[Scene]) -> Tensor:
    """Renders shapes scenes of one image size: uint8 ``(N, 3, H, W)``, objects on black.

    Example:
        >>> obj = ShapeObject("square", "red", (3.0, 3.0), 2, (2, 2, 4, 4))
        >>> render([Scene("single", (obj,), None, 1, 16)])[0, :, 2, 2].tolist()
        [220, 40, 40]
    """
    sizes = {scene.image_size for scene in scenes}
    if len(sizes) > 1:
        raise ValueError(f"render expected scenes of one image size, got sizes {sorted(sizes)}")
    size = sizes.pop() if sizes else 16
    images = np.zeros((len(scenes), size, size, 3), dtype=np.uint8)
    for index, scene in enumerate(scenes):
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            images[index, y0:y1, x0:x1][_mask(obj.shape, obj.size)] = PALETTE[obj.colour]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------
# Only ``Random.random()`` is used: Python guarantees its sequence across versions (not that of
# randrange/choice), so a seed gives the same scenes on any Python.


def _randint(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]``."""
    return low + int(rng.random() * (high - low + 1))


def _choice(rng: random.Random, options: Sequence):
    return options[int(rng.random() * len(options))]


def heldout_combinations(scene: Scene) -> list[str]:
    """The held-out combinations a scene contains, e.g. ``["purple triangle"]`` (empty if none)."""
    found = sorted(
        {f"{o.colour} {o.shape}" for o in scene.objects if (o.colour, o.shape) in HELDOUT_PAIRS}
    )
    colours = frozenset(o.colour for o in scene.objects)
    if scene.kind == "relation" and colours in HELDOUT_COLOUR_PAIRS:
        found.append(" & ".join(sorted(colours)))
    return found


def _object(shape: str, colour: str, x0: int, y0: int, size: int) -> ShapeObject:
    return ShapeObject(
        shape, colour, (x0 + size / 2, y0 + size / 2), size, (x0, y0, x0 + size, y0 + size)
    )


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two boxes ``(x0, y0, size)`` leave at least one background pixel between them."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    return ax + asz < bx or bx + bsz < ax or ay + asz < by or by + bsz < ay


def _place_apart(rng: random.Random, sizes: list[int], image: int) -> list[tuple[int, int]] | None:
    """Random top-left corners of boxes that keep a pixel apart, or None after many misses."""
    for _ in range(200):
        boxes: list[tuple[int, int, int]] = []
        for size in sizes:
            box = (_randint(rng, 0, image - size), _randint(rng, 0, image - size), size)
            if not all(_apart(box, other) for other in boxes):
                break
            boxes.append(box)
        else:
            return [(x, y) for x, y, _ in boxes]
    return None


def _place_relation(
    rng: random.Random, first: int, second: int, relation: str, image: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Corners of two boxes such that ``first <relation> second`` holds unambiguously.

    Along the relation's axis the boxes are separated by at least one pixel; across it the
    centres differ by at most half their separation along it.
    """
    if relation in ("right of", "below"):  # the mirror relation with the objects swapped
        mirrored = {"right of": "left of", "below": "above"}[relation]
        b, a = _place_relation(rng, second, first, mirrored, image)
        return a, b
    # Along the axis: the first box, then the second at least one pixel further.
    along_a = _randint(rng, 0, image - first - 1 - second)
    along_b = _randint(rng, along_a + first + 1, image - second)
    separation = (along_b + second / 2) - (along_a + first / 2)
    across_a = _randint(rng, 0, image - first)
    centre_a = across_a + first / 2
    options = [
        y for y in range(image - second + 1) if abs(y + second / 2 - centre_a) <= separation / 2
    ]
    across_b = _choice(rng, options)
    if relation == "left of":
        return (along_a, across_a), (along_b, across_b)
    return (across_a, along_a), (across_b, along_b)  # "above": the axis is y


def _sample_attributes(rng: random.Random, kind: str, image: int) -> Scene:
    """Colours, shapes, sizes and relation of a scene of one kind (object positions still zero)."""
    low, high = OBJECT_SIZES[image]
    if kind == "relation":
        first_colour = _choice(rng, COLOURS)
        second_colour = _choice(rng, [c for c in COLOURS if c != first_colour])
        objects = tuple(
            _object(_choice(rng, SHAPES), colour, 0, 0, _randint(rng, low, high))
            for colour in (first_colour, second_colour)
        )
        return Scene(kind, objects, _choice(rng, RELATIONS), 2, image)
    count = 1 if kind == "single" else _randint(rng, 1, 3)
    shape, colour = _choice(rng, SHAPES), _choice(rng, COLOURS)
    size = _randint(rng, low, high - 1 if count == 3 else high)  # three big ones rarely fit
    return Scene(
        kind, tuple(_object(shape, colour, 0, 0, size) for _ in range(count)), None, count, image
    )


def _sample_scene(rng: random.Random, split: str, kinds: Sequence[str], image: int) -> Scene:
    kind = _choice(rng, kinds)  # before the rejection loop, so kinds stay equally likely
    while True:
        scene = _sample_attributes(rng, kind, image)
        if bool(heldout_combinations(scene)) != (split == "heldout"):
            continue  # train/test exclude every held-out combination; heldout needs one
        sizes = [o.size for o in scene.objects]
        if scene.kind == "relation":
            corners = list(_place_relation(rng, *sizes, scene.relation, image))
        else:
            corners = _place_apart(rng, sizes, image)
            if corners is None:
                continue
        objects = tuple(
            _object(o.shape, o.colour, x, y, o.size)
            for o, (x, y) in zip(scene.objects, corners, strict=True)
        )
        return Scene(scene.kind, objects, scene.relation, scene.count, image)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class CaptionedImages(Dataset):
    """Images with captions and structured ground truth, held in memory.

    An item is ``(image, caption, scene)``: ``image`` float32 ``(C, H, W)`` at the level centres
    (:func:`to_float`), the caption string and the :class:`Scene` (or :class:`DigitScene`). Batch
    items with :meth:`collate` (scenes are not tensors), or use the bulk attributes directly.

    Attributes:
        images: uint8 ``(N, C, H, W)`` levels ``k`` in ``0..levels-1``.
        captions: ``N`` strings.
        scenes: ``N`` ground-truth records.
        levels: Number of intensity levels ``K`` (256 for shapes, 17 for digits).
    """

    def __init__(self, images: Tensor, captions: list[str], scenes: list, levels: int):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected images uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if not len(images) == len(captions) == len(scenes):
            raise ValueError(
                f"got {len(images)} images, {len(captions)} captions and {len(scenes)} scenes"
            )
        _check_levels(levels)
        self.images, self.captions, self.scenes, self.levels = images, captions, scenes, levels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, str, Scene | DigitScene]:
        return to_float(self.images[index], self.levels), self.captions[index], self.scenes[index]

    @staticmethod
    def collate(batch: Sequence[tuple[Tensor, str, object]]) -> tuple[Tensor, list[str], list]:
        """Stacks images and lists captions and scenes, for a ``DataLoader(collate_fn=...)``."""
        images, captions, scenes = zip(*batch, strict=True)
        return torch.stack(images), list(captions), list(scenes)


#: Registered captioned datasets: ``factory(split, n, seed, size) -> CaptionedImages``.
T2I_DATASETS: Registry[Callable[..., CaptionedImages]] = Registry("captioned dataset")


def _check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset} has splits {tuple(allowed)}, got split={split!r}")


@T2I_DATASETS.register("shapes")
def shapes(
    split: str = "train",
    n: int | None = 10_000,
    seed: int = 0,
    size: int | None = 16,
    kinds: Sequence[str] = KINDS,
) -> CaptionedImages:
    """Procedural shapes scenes; item ``i`` depends only on ``(seed, split, i)``.

    So ``n=100`` is a prefix of ``n=1000`` and every split is a different draw for one seed.

    Args:
        split: ``"train"``, ``"test"`` (fresh draw, same distribution) or ``"heldout"``.
        n: Number of scenes (default 10 000).
        seed: Any integer.
        size: 16 or 32 (default 16).
        kinds: Scene kinds to draw from, uniformly.
    """
    _check_split(split, SPLITS, "shapes")
    n = 10_000 if n is None else n
    size = 16 if size is None else size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shapes expected a positive integer n, got {n!r}")
    if size not in OBJECT_SIZES:
        raise ValueError(f"shapes expected size in {sorted(OBJECT_SIZES)}, got {size!r}")
    kinds = tuple(kinds)
    if not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"shapes expected kinds among {KINDS}, got {kinds}")
    scenes, captions = [], []
    for index in range(n):
        # A string seed is hashed (SHA-512) the same way on every Python and platform.
        rng = random.Random(f"trajflow_t2i.shapes/{seed}/{split}/{index}")
        scene = _sample_scene(rng, split, kinds, size)
        scenes.append(scene)
        captions.append(_choice(rng, paraphrases(scene)))
    return CaptionedImages(render(scenes), captions, scenes, levels=256)


#: Number of digits images held out as the test split (the last ones of scikit-learn's order).
DIGITS_TEST = 297


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


@T2I_DATASETS.register("digits")
def digits(
    split: str = "train", n: int | None = None, seed: int = 0, size: int | None = 8
) -> CaptionedImages:
    """scikit-learn's 8×8 handwritten digits, 1 channel, ``K = 17`` levels (values 0..16).

    Train is the first 1500 images, test the last :data:`DIGITS_TEST` = 297 (a fixed split).
    Dequantise with ``dequantize(images, generator, levels=17)``, i.e. ``x = 2(k + u)/17 - 1``
    on ``[-1, 1]``; bits/dim are then those of the 64 integer pixels, comparable with
    published numbers on this 17-level variable.

    Args:
        split: ``"train"`` or ``"test"``.
        n: The first ``n`` images of the split (default: all).
        seed: Picks each caption's paraphrase.
        size: Must be 8 (or None).
    """
    _check_split(split, ("train", "test"), "digits")
    if size not in (None, 8):
        raise ValueError(f"digits are 8×8; expected size 8 or None, got {size!r}")
    images, labels = _load_digits()
    if split == "train":
        images, labels = images[:-DIGITS_TEST], labels[:-DIGITS_TEST]
    else:
        images, labels = images[-DIGITS_TEST:], labels[-DIGITS_TEST:]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(images):
            raise ValueError(f"digits {split} has {len(images)} images; got n={n!r}")
        images, labels = images[:n], labels[:n]
    scenes = [DigitScene(int(label)) for label in labels]
    captions = [
        _choice(random.Random(f"trajflow_t2i.digits/{seed}/{split}/{i}"), paraphrases(scene))
        for i, scene in enumerate(scenes)
    ]
    return CaptionedImages(torch.from_numpy(images.copy())[:, None], captions, scenes, levels=17)


def make_split(
    name: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    size: int | None = None,
    **kwargs,
) -> CaptionedImages:
    """Builds ``split`` of the registered dataset ``name`` (``None`` means its default).

    Raises:
        KeyError: For an unknown dataset (the message lists the known ones).
        ValueError: For an unknown split, a bad ``n`` or ``size``.
    """
    factory = T2I_DATASETS.get(name)
    options = {"split": split, "seed": seed, **kwargs}
    if n is not None:
        options["n"] = n
    if size is not None:
        options["size"] = size
    return factory(**options)
